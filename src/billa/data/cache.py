"""Tokenise once: records -> (input_ids, labels) written as memory-mapped Arrow shards, reused across runs.

Every input file is read in chunks of records (one batched encode per chunk); with ``num_proc`` > 1 the chunks, not
the files, are the pool's unit of work, so one large shard keeps every worker busy. Each file's chunks are streamed in
order into an Arrow file under ``<cache>/<source>/<key>/<file hash>/``, renamed into place only when
complete. The key covers what determines the tokens: the file's content (a BLAKE2 hash of its bytes), the tokenizer
files, the objective and its settings (max length, seed, prompts, source name). Rerunning reuses every finished
shard; a killed pass redoes only the files whose shards were not finished. ``datasets`` memory-maps the shards, so a
7B run's corpus costs page cache, not RAM.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from billa.data.objectives import load_prompts
from billa.data.readers import HUB_PREFIX, ReadStats, expand_paths, read_records
from billa.data.tokenise_worker import _CHUNK, ObjectiveSettings, _encode_records, _init_worker, _schema
from billa.utils.logging import get_logger

log = get_logger(__name__)

_SHARD_DONE = "billa_shard.json"


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


def file_fingerprint(path: str, cache_root: Path) -> str:
    """Content hash of ``path``, hashed once: reused while the file's size and mtime are unchanged.

    The hashes live in ``<cache_root>/file_hashes.json``, so ``setup`` on every rank (and every later run) reads a
    small index instead of re-reading the whole corpus.
    """
    if path.startswith(HUB_PREFIX):
        return fingerprint(path)
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_root / "file_hashes.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if key not in index:
        index[key] = fingerprint(files=(path,))
        tmp = index_path.with_name(f".file_hashes.{os.getpid()}.json")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)  # atomic; a concurrent writer's entries are recomputed on demand, never wrong
    return index[key]


def tokenizer_fingerprint(tokenizer_dir: str) -> str:
    files = tuple(str(p) for p in sorted(Path(tokenizer_dir).glob("tokenizer*")) if p.is_file())
    return fingerprint("tokenizer", files=files)


def prompts_fingerprint(prompts_dir: str) -> str:
    return fingerprint(json.dumps(load_prompts(prompts_dir), sort_keys=True, ensure_ascii=False))


# ---- worker side: billa.data.tokenise_worker (a light module, so spawned workers start fast) -----------------------
def _record_chunks(path: str, settings: ObjectiveSettings, stats: ReadStats) -> Iterator[list]:
    """The records of one file in chunks of ``_CHUNK`` (the unit of work below the file level)."""
    what = f"data.sources.{settings.source}"
    records = read_records(path, settings.fmt, what, stats, settings.on_error, **dict(settings.reader_options))
    while chunk := list(itertools.islice(records, _CHUNK)):
        yield chunk


class _ShardWriter:
    """Streams one file's encoded chunks, in order, into a temporary Arrow shard; ``close`` renames it into place."""

    def __init__(self, path: str, shard_dir: str):
        import pyarrow as pa

        self.path, self.shard_dir, self.stats = path, shard_dir, ReadStats()
        self.tmp = Path(shard_dir + f".tmp{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.sink = pa.OSFile(str(self.tmp / "data.arrow"), "wb")
        self.writer = pa.ipc.new_stream(self.sink, _schema())
        self.examples = self.dropped = 0

    def write(self, rows: list, dropped: int) -> None:
        import pyarrow as pa

        self.dropped += dropped
        self.examples += len(rows)
        if rows:
            ids, labels, lines = zip(*rows, strict=True)
            columns = [
                pa.array(ids, pa.list_(pa.int32())),
                pa.array(labels, pa.list_(pa.int32())),
                pa.array(lines, pa.int64()),
            ]
            self.writer.write_batch(pa.record_batch(columns, schema=_schema()))

    def close(self) -> ShardResult:
        self.writer.close()
        self.sink.close()
        stats = self.stats
        result_stats = {
            "records": stats.read,
            "filtered": stats.filtered,
            "skipped_malformed": stats.skipped,
            "skipped_examples": stats.skipped_examples,
            "no_target_after_truncation": self.dropped,
        }
        done = {"file": self.path, "examples": self.examples, "stats": result_stats}
        (self.tmp / _SHARD_DONE).write_text(json.dumps(done))
        try:
            os.replace(self.tmp, self.shard_dir)
        except OSError:  # a concurrent pass finished the same shard: identical content
            shutil.rmtree(self.tmp, ignore_errors=True)
        return ShardResult(self.shard_dir, self.examples, result_stats)


def _tokenize_file(path: str, settings: ObjectiveSettings, shard_dir: str) -> ShardResult:
    """Read one file in chunks, apply the objective, stream Arrow record batches, rename the shard into place."""
    shard = _ShardWriter(path, shard_dir)
    for chunk in _record_chunks(path, settings, shard.stats):
        shard.write(*_encode_records(chunk, settings))
    return shard.close()


def _tokenize_pooled(
    todo: list[tuple[str, str]], settings: ObjectiveSettings, pool: ProcessPoolExecutor, window: int
) -> Iterator[tuple[str, ShardResult]]:
    """Tokenise ``todo`` (file, shard) with chunks of records, not files, as the pool's unit of work.

    The driver reads each file and submits its chunks; up to ``window`` chunks are in flight across files, so one
    large shard keeps every worker busy and small files do not wait for each other. Results are written in
    submission order, so each shard is byte-for-byte what one process writes (same cache key, same layout).
    Yields (file, result) as each file's shard is complete.
    """
    pending: collections.deque = collections.deque()  # (writer, future) in order; future None: the file is read
    in_flight = 0

    def pop() -> tuple[str, ShardResult] | None:
        nonlocal in_flight
        writer, future = pending.popleft()
        if future is None:
            return writer.path, writer.close()
        in_flight -= 1
        writer.write(*future.result())
        return None

    for path, shard_dir in todo:
        writer = _ShardWriter(path, shard_dir)
        for chunk in _record_chunks(path, settings, writer.stats):
            pending.append((writer, pool.submit(_encode_records, chunk, settings)))
            in_flight += 1
            while in_flight > window:
                if done := pop():
                    yield done
        pending.append((writer, None))
    while pending:
        if done := pop():
            yield done


# ---- driver side -------------------------------------------------------------------------------------------------
def tokenize_source(
    pattern: str,
    settings: ObjectiveSettings,
    tokenizer_dir: str,
    prompts_dir: str,
    cache_root: str | os.PathLike,
    num_proc: int = 1,
    what: str = "data.sources",
) -> tuple[datasets.Dataset, dict]:
    """Tokenise every file of ``pattern`` once (reusing finished shards); return the concatenated dataset + stats."""
    files = expand_paths(pattern, what)
    settings_key = fingerprint(
        json.dumps(asdict(settings), sort_keys=True),
        tokenizer_fingerprint(tokenizer_dir),
        prompts_fingerprint(prompts_dir),
    )
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
        desc = f"tokenising {settings.source} ({len(todo)} of {len(files)} files)"
        if num_proc > 1:
            # spawn, not fork: the caller may already hold threads (DataLoader, gloo, tokenizers' pool)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(num_proc, context, _init_worker, (tokenizer_dir, prompts_dir)) as pool:
                done = _tokenize_pooled(todo, settings, pool, window=2 * num_proc)
                for path, result in tqdm(done, desc=desc, unit="file", total=len(todo)):
                    shards[path] = result
        else:
            _init_worker(tokenizer_dir, prompts_dir)
            for path, shard in tqdm(todo, desc=desc, unit="file", disable=len(todo) < 2):
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
    return dataset.with_format("numpy", columns=["input_ids", "labels"]), totals
