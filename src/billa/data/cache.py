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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
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


# ---- driver side -------------------------------------------------------------------------------------------------
def _pieces_dir(shard: str) -> Path:
    """Where a file's finished pieces wait until all of them are done (reused by the next pass if this one dies)."""
    return Path(shard + ".pieces")


def _piece_out(shard: str, piece: Piece) -> str:
    return str(_pieces_dir(shard) / f"{piece.index:05d}.arrow")


def _piece_done(shard: str, piece: Piece) -> dict | None:
    marker = Path(_piece_out(shard, piece)).with_suffix(".json")
    return json.loads(marker.read_text()) if marker.is_file() else None


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
    """Join a file's finished pieces, in order, into its shard (one Arrow file) and rename the shard into place."""
    import pyarrow as pa

    pieces = _pieces_dir(shard)
    tmp = Path(shard + tmp_suffix())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrows = [pieces / f"{index:05d}.arrow" for index in range(len(results))]
    if len(arrows) == 1:
        os.replace(arrows[0], tmp / "data.arrow")
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
    except OSError:  # a concurrent pass finished the same shard: identical content
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(pieces, ignore_errors=True)
    return ShardResult(shard, examples, stats)


def _run_pass(todo: list[tuple[str, str]], settings: ObjectiveSettings, runner, piece_bytes: int):
    """Plan every file of ``todo`` into pieces, tokenise the pieces not finished yet, join each file's pieces.

    Yields ``(path, ShardResult or None, progress)`` as plans and pieces finish; ``progress`` is the fraction of a file
    (by input bytes) the event completed, so the progress line counts files and moves within a large one.
    """
    shard_of = dict(todo)
    for path, _ in todo:
        runner.submit(("plan", path, piece_bytes))
    pieces: dict[str, list[Piece]] = {}
    results: dict[str, list] = {}
    fraction: dict[str, float] = {}
    while (done := runner.next_result()) is not None:
        task, result = done
        if task[0] == "plan":
            path = task[1]
            shard = shard_of[path]
            _pieces_dir(shard).mkdir(parents=True, exist_ok=True)
            pieces[path], results[path] = result, [_piece_done(shard, piece) for piece in result]
            for piece, finished in zip(result, results[path], strict=True):
                if finished is None:
                    runner.submit(("piece", piece, settings, _piece_out(shard, piece)))
        else:
            path = task[1].path
            results[path][task[1].index] = result
        finished = [p for p, r in zip(pieces[path], results[path], strict=True) if r is not None]
        before, total = fraction.get(path, 0.0), sum(p.size for p in pieces[path])
        complete = len(finished) == len(pieces[path])
        fraction[path] = 1.0 if complete else sum(p.size for p in finished) / total if total else 0.0
        shard = _join_pieces(path, shard_of[path], results[path]) if complete else None
        yield path, shard, fraction[path] - before


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
        with runner:
            events = _run_pass(todo, settings, runner, piece_bytes)
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
