"""Tokenise once: records -> (input_ids, labels) written as memory-mapped Arrow shards, reused across runs.

Every input file is one unit of work, processed by a pool of ``num_proc`` workers in chunks (one batched encode per
chunk) and streamed into an Arrow file under ``<cache>/<source>/<key>/<file hash>/``, renamed into place only when
complete. The key covers what determines the tokens: the file's content (a BLAKE2 hash of its bytes), the tokenizer
files, the objective and its settings (max length, prompts, prompt-type map, source name; not the seed).

Each row holds every variant the record can become (``objectives.Variants``: all translation direction x prompt
and task placement x prompt combinations with their probabilities, or the full ids of a text for a cut drawn
later), so the random choices are drawn per visit at ``__getitem__`` time while tokenisation still happens once
(the cost: a record with k prompt lines is stored k times; docs/recipe.md, "Per-visit draws"). Rerunning reuses
every finished shard; a killed pass redoes only the files whose shards were not finished. ``datasets`` memory-maps
the shards, so a 7B run's corpus costs page cache, not RAM.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import socket
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets

from billa.data.objectives import Example, ObjectiveContext, Variants, load_prompts, record_rng, variants
from billa.data.readers import HUB_PREFIX, READER_VERSION, ReadStats, expand_paths, read_records
from billa.progress import track
from billa.utils.logging import get_logger

log = get_logger(__name__)

_SHARD_DONE = "billa_shard.json"
_FORMAT_VERSION = "variants-1"  # rows hold every variant of a record (see the module docstring)


@dataclass(frozen=True)
class ObjectiveSettings:
    """Everything besides the input file that determines the tokens of a shard."""

    source: str
    fmt: str
    objective: str
    max_len: int
    seed: int
    translation_extra_newline: bool
    reader_options: tuple = ()
    on_error: str = "raise"
    prompt_types: tuple = ()  # (record type, prompt-file stem) pairs: data.prompt_types


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
        tmp = index_path.with_name(index_path.name + _tmp_suffix())
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)  # atomic; a concurrent writer's entries are recomputed on demand, never wrong
    return index[key]


_TMP = re.compile(r"\.tmp(?:-(?P<host>.*)-)?(?P<pid>\d+)$")  # ".tmp-<host>-<pid>" (or the older ".tmp<pid>")


def _tmp_suffix() -> str:
    """Suffix of this process's temporary files and directories: whose they are, so leftovers can be removed."""
    return f".tmp-{socket.gethostname()}-{os.getpid()}"


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
    for path in [*root.glob("*/*/*.tmp*"), *root.glob("file_hashes.json.tmp*")]:
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


# ---- worker side -------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, prompts: dict[str, list[str]]) -> None:
    from billa.tokenizer.load import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    _WORKER["tokenizer"] = tokenizer
    _WORKER["prompts"] = prompts


_CHUNK = 2000  # records tokenised together (one batched encode, one Arrow record batch)


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("input_ids", pa.list_(pa.list_(pa.int32()))),  # one list per variant
            ("labels", pa.list_(pa.list_(pa.int32()))),
            ("weights", pa.list_(pa.float64())),  # each variant's probability
            ("cut", pa.bool_()),  # conditional generation: the cut is drawn per visit
            ("line", pa.int64()),
        ]
    )


def _encode_chunk(records: list, settings: ObjectiveSettings, ctx: ObjectiveContext, tokenizer) -> tuple[list, int]:
    """Every variant of every record of a chunk (``objectives.variants``), with one batched encode.

    Objectives are pure functions of the record and the prompts, so a first pass records the strings they encode,
    one batched call encodes them, and a second pass builds the variants from the lookup.
    """
    wanted: dict[str, None] = {}

    def record_text(text: str) -> list[int]:
        wanted[text] = None
        return []

    ctx.encode = record_text
    for record in records:
        variants(settings.objective, record.fields, ctx)
    texts = list(wanted)
    encoded = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True)) if texts else {}
    ctx.encode = encoded.__getitem__
    examples, dropped = [], 0
    for record in records:
        found = variants(settings.objective, record.fields, ctx)
        if found is None:
            dropped += 1
        else:
            examples.append((found, record.line))
    return examples, dropped


def _tokenize_file(path: str, settings: ObjectiveSettings, shard_dir: str) -> ShardResult:
    """Read one file in chunks, apply the objective, stream Arrow record batches, rename the shard into place."""
    import pyarrow as pa

    _IDS = pa.list_(pa.list_(pa.int32()))  # noqa: N806
    tokenizer = _WORKER["tokenizer"]
    ctx = ObjectiveContext(
        encode=None,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        max_len=settings.max_len,
        prompts=_WORKER["prompts"],
        translation_extra_newline=settings.translation_extra_newline,
        prompt_types=dict(settings.prompt_types),
    )
    stats = ReadStats()
    tmp = Path(shard_dir + _tmp_suffix())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_examples = dropped = 0
    what = f"data.sources.{settings.source}"
    records = read_records(path, settings.fmt, what, stats, settings.on_error, **dict(settings.reader_options))
    with pa.OSFile(str(tmp / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, _schema()) as writer:
        while chunk := list(itertools.islice(records, _CHUNK)):
            examples, chunk_dropped = _encode_chunk(chunk, settings, ctx, tokenizer)
            dropped += chunk_dropped
            n_examples += len(examples)
            if examples:
                writer.write_batch(
                    pa.record_batch(
                        [
                            pa.array([[e.input_ids for e in v.examples] for v, _ in examples], _IDS),
                            pa.array([[e.labels for e in v.examples] for v, _ in examples], _IDS),
                            pa.array([list(v.weights) for v, _ in examples], pa.list_(pa.float64())),
                            pa.array([v.cut for v, _ in examples], pa.bool_()),
                            pa.array([line for _, line in examples], pa.int64()),
                        ],
                        schema=_schema(),
                    )
                )
    result_stats = {
        "records": stats.read,
        "filtered": stats.filtered,
        "skipped_malformed": stats.skipped,
        "empty_text": stats.empty,
        "skipped_examples": stats.skipped_examples,
        "no_target_after_truncation": dropped,
    }
    (tmp / _SHARD_DONE).write_text(json.dumps({"file": path, "examples": n_examples, "stats": result_stats}))
    try:
        os.replace(tmp, shard_dir)
    except OSError:  # a concurrent pass finished the same shard: identical content
        shutil.rmtree(tmp, ignore_errors=True)
    return ShardResult(shard_dir, n_examples, result_stats)


# ---- driver side -------------------------------------------------------------------------------------------------
def tokenize_source(
    pattern: str | list[str],
    settings: ObjectiveSettings,
    tokenizer_dir: str,
    prompts: dict[str, list[str]] | str | os.PathLike,
    cache_root: str | os.PathLike,
    num_proc: int = 1,
    what: str = "data.sources",
) -> tuple[datasets.Dataset, dict]:
    """Tokenise every file of ``pattern`` (or a list of files) once, reusing finished shards.

    ``prompts`` is the loaded prompt set (``objectives.load_prompts``) or a prompts directory.

    Returns:
        The source as a ``VariantSource`` (one draw per visit) over the memory-mapped shards, and the read stats.
    """
    if not isinstance(prompts, dict):
        prompts = load_prompts(prompts)
    files = list(pattern) if isinstance(pattern, list) else expand_paths(pattern, what)
    settings_key = fingerprint(
        f"readers/{READER_VERSION}",
        # the seed only drives the per-visit draws, made after the cache: a seed sweep reuses the shards
        json.dumps({k: v for k, v in asdict(settings).items() if k != "seed"}, sort_keys=True),
        tokenizer_fingerprint(tokenizer_dir),
        prompts_fingerprint(prompts),
        _FORMAT_VERSION,
    )
    remove_stale_temp(cache_root)
    root = Path(cache_root) / settings.source / settings_key
    root.mkdir(parents=True, exist_ok=True)
    shards, todo = {}, []
    for path in files:
        shard = root / file_fingerprint(path, Path(cache_root))
        if (shard / _SHARD_DONE).is_file():
            shards[path] = ShardResult(str(shard), -1, reused=True)
        else:
            todo.append((path, str(shard)))
    if todo:
        reused = f", {len(files) - len(todo)} reused" if len(todo) < len(files) else ""
        desc = f"tokenising {what.removeprefix('data.sources.')}{reused}"
        if num_proc > 1 and len(todo) > 1:
            # spawn, not fork: the caller may already hold threads (DataLoader, gloo, tokenizers' pool)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(num_proc, context, _init_worker, (tokenizer_dir, prompts)) as pool:
                futures = {pool.submit(_tokenize_file, path, settings, shard): path for path, shard in todo}
                for future in track(as_completed(futures), len(futures), desc, "files"):
                    shards[futures[future]] = future.result()
        else:
            _init_worker(tokenizer_dir, prompts)
            for path, shard in track(todo, len(todo), desc, "files"):
                shards[path] = _tokenize_file(path, settings, shard)
    parts, totals = [], {}
    for path in files:  # input order, whatever order the workers finished in
        shard = Path(shards[path].path)
        parts.append(datasets.Dataset.from_file(str(shard / "data.arrow")))  # memory-mapped
        info = json.loads((shard / _SHARD_DONE).read_text())
        for key, value in info["stats"].items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
        totals.setdefault("skipped_examples", []).extend(info["stats"].get("skipped_examples", [])[:2])
    totals["files"] = len(files)
    totals["reused_shards"] = sum(r.reused for r in shards.values())
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    totals["examples"] = len(dataset)
    return VariantSource(dataset, settings.seed, settings.source), totals


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
