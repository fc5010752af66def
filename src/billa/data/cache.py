"""Tokenise once: records -> (input_ids, labels) written as memory-mapped Arrow shards, reused across runs.

Every input file is split into pieces of about 4 MiB of input (``readers.plan_pieces``), the pieces are tokenised by
``num_proc`` worker processes (``billa.data.tokenise``; one batched encode per chunk of records), and each file's
pieces are joined, in order, into one Arrow file under ``<cache>/<source>/<key>/<file hash>/``, renamed into place
only when complete. The key covers what determines the tokens: the file's content (a BLAKE2 hash of its bytes), the
tokenizer files, the objective and its settings (max length, prompts, prompt-type map, source name; not the seed).
The shards do not depend on ``num_proc``.

Each row holds every variant the record can become (``objectives.Variants``: all translation direction x prompt
and task placement x prompt combinations with their probabilities, or the full ids of a text for a cut drawn
later), so the random choices are drawn per visit at ``__getitem__`` time while tokenisation still happens once
(the cost: a record with k prompt lines is stored k times; docs/recipe.md, "Per-visit draws"). Rerunning reuses
every finished shard, and a killed pass also keeps the finished pieces of the file it was in (``<file hash>.pieces``).
``datasets`` memory-maps the shards, so a 7B run's corpus costs page cache, not RAM.

Any number of passes (processes, on one node or on several sharing the file system) may tokenise the same files at
once: a piece, and the join of a file's pieces, is done by the pass that claims it (``Claims``); the others wait for
it, or take it over once its owner is gone. Every pass ends with the same shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from billa.data.objectives import Example, Variants, load_prompts, record_rng
from billa.data.readers import HUB_PREFIX, PIECE_BYTES, READER_VERSION, Piece, expand_paths
from billa.data.tokenise import InProcess, ObjectiveSettings, WorkerPool, schema, tmp_suffix, tokenizer_spec
from billa.progress import track
from billa.tokenizer.load import load_tokenizer
from billa.utils.logging import get_logger

if TYPE_CHECKING:
    import datasets

log = get_logger(__name__)

_SHARD_DONE = "billa_shard.json"
_FORMAT_VERSION = "variants-1"  # rows hold every variant of a record (see the module docstring)


@dataclass
class ShardResult:
    path: str
    examples: int
    stats: dict = field(default_factory=dict)
    reused: bool = False


def _hash_file(path: str, digest) -> None:
    if path.startswith(HUB_PREFIX):
        digest.update(path.encode())
        return
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)


def fingerprint(*parts: bytes | str, files: tuple[str, ...] = ()) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\x1f")
    for path in files:
        _hash_file(path, digest)
    return digest.hexdigest()


_SAMPLE = 1 << 16  # bytes hashed at each end of a file for the index key


def _sample_hash(path: str, size: int) -> str:
    """BLAKE2 of the first and last 64 KiB: a cheap content check beside the file's metadata."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as handle:
        digest.update(handle.read(_SAMPLE))
        if size > _SAMPLE:
            handle.seek(max(_SAMPLE, size - _SAMPLE))
            digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()


def file_fingerprint(path: str, cache_root: Path) -> str:
    """Content hash of ``path`` (all its bytes), computed once and reused while the file is unchanged.

    "Unchanged" means the same path, size, modification time, inode change time (ctime: any write or metadata
    change updates it, and no user tool can set it back) and inode, plus the same first and last 64 KiB. An edit
    that keeps size and mtime still changes ctime. The hashes live in ``<cache_root>/file_hashes.json``, so
    ``setup`` on every rank (and every later run) reads a small index instead of re-reading the whole corpus.
    """
    if path.startswith(HUB_PREFIX):
        return fingerprint(path)
    stat = os.stat(path)
    key = (
        f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}|"
        f"{_sample_hash(path, stat.st_size)}"
    )
    index_path = cache_root / "file_hashes.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if key not in index:
        index[key] = fingerprint(files=(path,))
        tmp = index_path.with_name(index_path.name + tmp_suffix())
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)  # atomic; a concurrent writer's entries are recomputed on demand, never wrong
    return index[key]


_TMP = re.compile(r"\.tmp(?:-(?P<host>.*)-)?(?P<pid>\d+)$")  # ".tmp-<host>-<pid>" (or the older ".tmp<pid>")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_temp(cache_root: str | os.PathLike) -> int:
    """Remove temporary shard directories and index files that killed or failed passes on this host left behind.

    Only entries of this host whose process is gone are removed: a pass still running (here or on another node
    sharing the cache) keeps its directory. Returns the number removed.
    """
    host, removed = socket.gethostname(), 0
    root = Path(cache_root)
    for pieces in root.glob("*/*/*.pieces"):  # left by a pass that saw another's live claim when its shard was done
        shard = pieces.with_name(pieces.name.removesuffix(".pieces"))
        if _shard_done(shard):
            _remove_pieces(shard, set())
    temporary = [*root.glob("*/*/*.tmp*"), *root.glob("*/*/*.pieces/*.tmp*"), *root.glob("*/*/stream-*/*/*.tmp*")]
    for path in [*temporary, *root.glob("file_hashes.json.tmp*")]:
        match = _TMP.search(path.name)
        if not match or match["host"] not in (None, host) or int(match["pid"]) == os.getpid():
            continue
        if _alive(int(match["pid"])):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("Removed %d temporary entries that killed tokenisation passes left in %s", removed, root)
    return removed


def tokenizer_fingerprint(tokenizer_dir: str) -> str:
    files = tuple(str(p) for p in sorted(Path(tokenizer_dir).glob("tokenizer*")) if p.is_file())
    return fingerprint("tokenizer", files=files)


def prompts_fingerprint(prompts: dict[str, list[str]]) -> str:
    return fingerprint(json.dumps(prompts, sort_keys=True, ensure_ascii=False))


# ---- claims: which pass does a piece (or a join) when several tokenise the same files --------------------------------
CLAIM_FRESH_S = 120.0  # a claim not refreshed for this long belongs to a process (or node) that is gone
CLAIM_REFRESH_S = 10.0  # how often a pass refreshes the claims it holds: well inside CLAIM_FRESH_S
POLL_S = 0.2  # how often a pass waiting for another's piece or join looks again


def _stale(claim: Path, held: set[Path]) -> bool:
    """Whether the owner of ``claim`` is gone: a dead process of this host at once, any other once the claim has not
    been refreshed for ``CLAIM_FRESH_S``. Raises FileNotFoundError when the claim itself is gone."""
    if claim in held:
        return False
    if time.time() - claim.stat().st_mtime > CLAIM_FRESH_S:
        return True
    host, _, pid = claim.read_text().rpartition(" ")  # empty while its owner has not written it yet
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return int(pid) == os.getpid() or not _alive(int(pid))  # this process holds none outside ``held``


class Claims:
    """This pass's claims on shared work: files created with O_EXCL holding ``<host> <pid>``, refreshed while held.

    Another pass waits while a claim is fresh and takes it over once its owner is gone (``_stale``). Two passes
    taking over the same stale claim at once both do the work: the results are identical and renamed into place
    atomically. Leaving the ``with`` block releases every claim still held.
    """

    def __init__(self):
        self.held: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="billa-claims", daemon=True)

    def take(self, claim: Path) -> bool:
        """True when this pass now holds ``claim``; False while another live pass holds it.

        Raises FileNotFoundError when the claim's directory is gone.
        """
        for _ in range(3):  # a claim released or taken over between our two looks: look again
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    if not _stale(claim, self.held):
                        return False
                except FileNotFoundError:
                    continue
                claim.unlink(missing_ok=True)  # its owner is gone: take over
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{socket.gethostname()} {os.getpid()}")
            with self._lock:
                self.held.add(claim)
            return True
        return False

    def release(self, claim: Path) -> None:
        with self._lock:
            self.held.discard(claim)
        claim.unlink(missing_ok=True)

    def _refresh(self) -> None:
        while not self._stop.wait(CLAIM_REFRESH_S):
            with self._lock:
                held = list(self.held)
            for claim in held:
                try:
                    os.utime(claim)
                except FileNotFoundError:  # taken over by a pass that thought us gone: it redoes the same work
                    pass

    def __enter__(self) -> Claims:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for claim in list(self.held):
            self.release(claim)


# ---- driver side -------------------------------------------------------------------------------------------------
def _pieces_dir(shard: str | Path) -> Path:
    """Where a file's finished pieces wait until all of them are done (reused by the next pass if this one dies)."""
    return Path(f"{shard}.pieces")


def _piece_out(shard: str | Path, piece: Piece) -> str:
    return str(_pieces_dir(shard) / f"{piece.index:05d}.arrow")


def _piece_claim(shard: str | Path, index: int) -> Path:
    return _pieces_dir(shard) / f"{index:05d}.claim"


def _join_claim(shard: str | Path) -> Path:
    return _pieces_dir(shard) / "join.claim"


def _piece_done(shard: str | Path, piece: Piece) -> dict | None:
    marker = Path(_piece_out(shard, piece)).with_suffix(".json")
    try:
        return json.loads(marker.read_text())
    except FileNotFoundError:  # not done yet, or its pieces were removed after the join (the shard exists)
        return None


def _shard_done(shard: str | Path) -> bool:
    return (Path(shard) / _SHARD_DONE).is_file()


def _shard_made_elsewhere(shard: str | Path) -> ShardResult:
    info = json.loads((Path(shard) / _SHARD_DONE).read_text())
    return ShardResult(str(shard), info["examples"], info["stats"], reused=True)


def sum_stats(parts: list[dict], examples_each: int, examples_kept: int | None = None) -> dict:
    """Counters of pieces or files added up; ``skipped_examples`` keeps the first ``examples_each`` of each part
    (at most ``examples_kept`` in all)."""
    total: dict = {"skipped_examples": []}
    for stats in parts:
        for key, value in stats.items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
        total["skipped_examples"].extend(stats.get("skipped_examples", [])[:examples_each])
    total["skipped_examples"] = total["skipped_examples"][:examples_kept]
    return total


def _join_pieces(path: str, shard: str, results: list[dict]) -> ShardResult:
    """Join a file's finished pieces, in order, into its shard (one Arrow file) and rename the shard into place.

    The pieces stay where they are (a single piece is linked, not moved): a pass taking over a join whose owner died
    finds them all. If another pass renamed the same shard into place first, this one's copy is discarded.
    """
    import pyarrow as pa

    pieces = _pieces_dir(shard)
    tmp = Path(shard + tmp_suffix())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrows = [pieces / f"{index:05d}.arrow" for index in range(len(results))]
    if len(arrows) == 1:
        try:
            os.link(arrows[0], tmp / "data.arrow")
        except OSError:  # a file system without hard links
            shutil.copyfile(arrows[0], tmp / "data.arrow")
    else:  # one memory-mapped file per input file: a corpus of 4 MiB pieces would exhaust mmap limits
        with pa.OSFile(str(tmp / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema()) as writer:
            for arrow in arrows:
                with pa.ipc.open_stream(pa.memory_map(str(arrow))) as reader:
                    for batch in reader:
                        writer.write_batch(batch)
    stats = sum_stats([result["stats"] for result in results], examples_each=5, examples_kept=5)
    examples = sum(result["examples"] for result in results)
    (tmp / _SHARD_DONE).write_text(json.dumps({"file": path, "examples": examples, "stats": stats}))
    try:
        os.replace(tmp, shard)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _shard_done(shard):
            raise
        return _shard_made_elsewhere(shard)  # a pass that took over our join finished first: identical content
    return ShardResult(shard, examples, stats)


def _remove_pieces(shard: str | Path, held: set[Path]) -> None:
    """Remove a finished shard's pieces, unless a claim of another live pass is among them (that pass removes them).

    Called only once the shard exists, while a pass that claims a piece or the join checks for the shard only after
    its claim exists: so either this sees the claim or that pass sees the shard, and no pass writes into (or joins
    from) removed pieces.
    """
    pieces = _pieces_dir(shard)
    for claim in pieces.glob("*.claim"):
        try:
            if not _stale(claim, held):
                return
        except FileNotFoundError:  # released meanwhile
            continue
    gone = pieces.with_name(pieces.name + tmp_suffix())  # one rename: no pass sees half the pieces removed
    shutil.rmtree(gone, ignore_errors=True)
    try:
        os.rename(pieces, gone)
    except FileNotFoundError:  # removed by another pass
        return
    shutil.rmtree(gone, ignore_errors=True)


@dataclass
class _FileWork:
    """One input file in a pass: its pieces, their results (this pass's or another's), the pieces this pass runs."""

    path: str
    shard: str
    pieces: list[Piece]
    results: list[dict | None]
    running: set[int] = field(default_factory=set)
    waiting: bool = False  # on a piece or the join that another pass holds
    reported: float = 0.0  # the fraction of the file (by input bytes) already reported as progress

    def progress(self) -> float:
        """The fraction of the file done since the last call."""
        total = sum(p.size for p in self.pieces)
        done = sum(p.size for p, r in zip(self.pieces, self.results, strict=True) if r is not None)
        fraction = done / total if total else float(all(r is not None for r in self.results))
        before, self.reported = self.reported, fraction
        return fraction - before


def _advance(work: _FileWork, settings: ObjectiveSettings, runner, claims: Claims, free: int) -> tuple:
    """Take one file as far as it goes now: note the pieces others finished, claim and submit up to ``free`` pieces,
    join once every piece is done.

    Returns:
        ``(ShardResult or None, pieces submitted)``.
    """
    shard = work.shard
    if _shard_done(shard):
        if work.running:  # our claims were taken over; wait for our pieces before leaving
            return None, 0
        _remove_pieces(shard, claims.held)
        return _shard_made_elsewhere(shard), 0
    work.waiting, taken = False, []
    try:
        for piece in work.pieces:
            if work.results[piece.index] is not None or piece.index in work.running:
                continue
            if (found := _piece_done(shard, piece)) is not None:
                work.results[piece.index] = found
            elif len(taken) < free:
                _pieces_dir(shard).mkdir(exist_ok=True)
                claim = _piece_claim(shard, piece.index)
                if not claims.take(claim):
                    work.waiting = True
                elif (found := _piece_done(shard, piece)) is not None:  # its owner finished just before our claim
                    claims.release(claim)
                    work.results[piece.index] = found
                else:
                    taken.append(piece)
    except FileNotFoundError:  # the pieces went away: another pass finished the shard (seen below or next time)
        work.waiting = True
    if _shard_done(shard):  # checked after claiming: see _remove_pieces
        for piece in taken:
            claims.release(_piece_claim(shard, piece.index))
        return _advance(work, settings, runner, claims, 0)
    for piece in taken:
        work.running.add(piece.index)
        runner.submit(("piece", piece, settings, _piece_out(shard, piece)))
    if work.running or any(r is None for r in work.results):
        return None, len(taken)
    return _join(work, claims), 0


def _join(work: _FileWork, claims: Claims) -> ShardResult | None:
    """Join the file's pieces if no other pass is joining them; None while another is (the caller waits)."""
    claim = _join_claim(work.shard)
    try:
        _pieces_dir(work.shard).mkdir(exist_ok=True)  # a file without pieces has none yet
        taken = claims.take(claim)
    except FileNotFoundError:
        taken = False
    if not taken:
        work.waiting = True
        return None
    try:
        if _shard_done(work.shard):  # checked after claiming: see _remove_pieces
            result = _shard_made_elsewhere(work.shard)
        else:
            result = _join_pieces(work.path, work.shard, work.results)
    finally:
        claims.release(claim)
    _remove_pieces(work.shard, claims.held)
    return result


def _run_pass(todo: list[tuple[str, str]], settings: ObjectiveSettings, runner, piece_bytes: int, claims: Claims):
    """Plan every file of ``todo`` into pieces, tokenise the pieces no pass has finished or holds, join each file.

    Pieces that another pass holds are waited for (polling every ``POLL_S``), or taken over once it is gone. Yields
    ``(path, ShardResult or None, progress)`` as plans and pieces finish; ``progress`` is the fraction of a file (by
    input bytes) the event completed, so the progress line counts files and moves within a large one.
    """
    shard_of = dict(todo)
    for path, _ in todo:
        runner.submit(("plan", path, piece_bytes))
    in_flight, waiting = len(todo), False
    files: dict[str, _FileWork] = {}
    left = set(shard_of)
    while left:
        if in_flight:
            done = runner.next_result(timeout=POLL_S if waiting else None)
        else:  # everything left is another pass's to do
            done = None
            time.sleep(POLL_S)
        if done is not None:
            in_flight -= 1
            task, result = done
            if task[0] == "plan":
                files[task[1]] = _FileWork(task[1], shard_of[task[1]], result, [None] * len(result))
            else:
                work = files[task[1].path]
                work.results[task[1].index] = result
                work.running.discard(task[1].index)
                claims.release(_piece_claim(work.shard, task[1].index))
        waiting = False
        for path, work in files.items():
            if path not in left:
                continue
            shard, submitted = _advance(work, settings, runner, claims, runner.slots - in_flight)
            in_flight += submitted
            waiting |= work.waiting
            progress = 1.0 - work.reported if shard is not None else work.progress()
            if shard is not None:
                left.discard(path)
            if shard is not None or progress:
                yield path, shard, progress


def tokenize_source(
    pattern: str | list[str],
    settings: ObjectiveSettings,
    tokenizer_dir: str,
    prompts: dict[str, list[str]] | str | os.PathLike,
    cache_root: str | os.PathLike,
    num_proc: int = 1,
    what: str = "data.sources",
    piece_bytes: int = PIECE_BYTES,
) -> tuple[VariantSource, dict]:
    """Tokenise every file of ``pattern`` (or a list of files) once, reusing finished shards and pieces.

    ``prompts`` is the loaded prompt set (``objectives.load_prompts``) or a prompts directory. Files are split into
    pieces of about ``piece_bytes`` of input (``readers.plan_pieces``), so ``num_proc`` workers share one large file
    as well as many small ones; the shards do not depend on ``num_proc`` or ``piece_bytes``.

    Returns:
        The source as a ``VariantSource`` (one draw per visit) over the memory-mapped shards, and the read stats.
    """
    import datasets

    files = list(pattern) if isinstance(pattern, list) else expand_paths(pattern, what)
    shards = tokenise_files(files, settings, tokenizer_dir, prompts, cache_root, num_proc, what, piece_bytes)
    parts, per_file = [], []
    for path in files:  # input order, whatever order the workers finished in
        shard = Path(shards[path].path)
        parts.append(datasets.Dataset.from_file(str(shard / "data.arrow")))  # memory-mapped
        per_file.append(json.loads((shard / _SHARD_DONE).read_text())["stats"])
    totals = sum_stats(per_file, examples_each=2)
    totals["files"] = len(files)
    totals["reused_shards"] = sum(r.reused for r in shards.values())
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    totals["examples"] = len(dataset)
    return VariantSource(dataset, settings.seed, settings.source), totals


def settings_key(settings: ObjectiveSettings, tokenizer_dir: str, prompts: dict[str, list[str]]) -> str:
    """The cache directory of a source's tokens: what determines them besides the input file."""
    return fingerprint(
        f"readers/{READER_VERSION}",
        # the seed only drives the per-visit draws, made after the cache: a seed sweep reuses the shards
        json.dumps({k: v for k, v in asdict(settings).items() if k != "seed"}, sort_keys=True),
        tokenizer_fingerprint(tokenizer_dir),
        prompts_fingerprint(prompts),
        _FORMAT_VERSION,
    )


def tokenise_files(
    files: list[str],
    settings: ObjectiveSettings,
    tokenizer_dir: str,
    prompts: dict[str, list[str]] | str | os.PathLike,
    cache_root: str | os.PathLike,
    num_proc: int = 1,
    what: str = "data.sources",
    piece_bytes: int = PIECE_BYTES,
) -> dict[str, ShardResult]:
    """The tokenisation pass of ``tokenize_source`` alone: each file's shard, made now or reused."""
    if not isinstance(prompts, dict):
        prompts = load_prompts(prompts)
    remove_stale_temp(cache_root)
    root = Path(cache_root) / settings.source / settings_key(settings, tokenizer_dir, prompts)
    root.mkdir(parents=True, exist_ok=True)
    shards, todo = {}, []
    for path in files:
        shard = root / file_fingerprint(path, Path(cache_root))
        if (shard / _SHARD_DONE).is_file():
            shards[path] = ShardResult(str(shard), -1, reused=True)
        else:
            todo.append((path, str(shard)))
    if todo:
        reused = f", {len(files) - len(todo)} files reused" if len(todo) < len(files) else ""
        desc = f"tokenising {what.removeprefix('data.sources.')}{reused}"
        size = sum(0 if path.startswith(HUB_PREFIX) else os.path.getsize(path) for path, _ in todo)
        spec = tokenizer_spec(load_tokenizer(tokenizer_dir))
        # worker start-up (~0.3 s each) only pays off beyond one piece of input
        parallel = num_proc > 1 and (size > piece_bytes or len(todo) > 1 and size == 0)
        runner = WorkerPool(num_proc, spec, prompts) if parallel else InProcess(spec, prompts)
        with Claims() as claims, runner:
            events = _run_pass(todo, settings, runner, piece_bytes, claims)
            for path, result, _ in track(events, len(todo), desc, "files", amount=lambda event: event[2]):
                if result is not None:
                    shards[path] = result
    return shards


class VariantSource:
    """A tokenised source whose records are drawn per visit: ``source.example(index, visit)`` -> input_ids, labels.

    The draw uses ``record_rng(seed, source, index, visit)``: a record's cut point, translation direction and prompt,
    or task prompt placement and line change from one visit (epoch of this source) to the next, and are the same on
    every run and after every resume. ``source[index]`` is visit 0 (validation).
    """

    def __init__(self, dataset: datasets.Dataset, seed: int, name: str):
        self.dataset = dataset.with_format(None, columns=["input_ids", "labels", "weights", "cut"])
        self.seed, self.name = seed, name

    def __len__(self) -> int:
        return len(self.dataset)

    def variants(self, index: int) -> Variants:
        row = self.dataset[int(index)]
        examples = tuple(Example(ids, labels) for ids, labels in zip(row["input_ids"], row["labels"], strict=True))
        return Variants(examples, tuple(row["weights"]), bool(row["cut"]))

    def example(self, index: int, visit: int = 0) -> dict:
        example = self.variants(index).draw(record_rng(self.seed, self.name, int(index), visit))
        return {"input_ids": example.input_ids, "labels": example.labels}

    def __getitem__(self, index: int) -> dict:
        return self.example(index, 0)
