"""Readers: files in the formats users already have (DESIGN.md §4) -> normalised records.

Each reader yields ``Record``s: a small dict in one of the record kinds the objectives understand, plus where it
came from (file, line) so that every later error can point at the input.

Files: ``.jsonl`` (also ``.txt``, as LogiQA ships it), ``.json`` arrays, ``.jsonl.zst`` (PILE's shards, streamed),
``.parquet`` (line = row number), globs and directories of shards, and ``hf://<dataset>[:<config>][@<split>]`` for a
Hugging Face hub dataset read in streaming mode (needs network; line = row number).

kinds and their fields:
    text:        {"text"}
    translation: {"en", "zh"}
    task:        {"input", "output", "type"}
    instruction: {"instruction", "input", "output"}
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


class DataFormatError(ValueError):
    """A record does not parse or lacks its fields; the message names the file and line."""


@dataclass
class Record:
    fields: dict
    file: str
    line: int  # 1-based line in a jsonl file; 1-based element index in a JSON array

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class ReadStats:
    read: int = 0
    filtered: int = 0  # dropped on purpose by a documented filter (e.g. PILE subsets), counted
    skipped: int = 0  # malformed records skipped because the user chose on_error=skip, counted and reported
    skipped_examples: list[str] = field(default_factory=list)  # the first few, "file:line: why"
    files: list[str] = field(default_factory=list)


HUB_PREFIX = "hf://"


def expand_paths(pattern: str | os.PathLike, what: str) -> list[str]:
    """Files named by a path, a glob or a directory (its files, sorted). ``what`` names the config key for errors."""
    pattern = str(pattern)
    if pattern.startswith(HUB_PREFIX):
        return [pattern]
    if os.path.isdir(pattern):
        files = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"{what}: no file matches {pattern!r}")
    return files


def _json_lines(lines, path: str) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, DataFormatError(f"{path}:{number}: not valid JSON ({err.msg})")


def _hub_rows(spec: str) -> Iterator[tuple[int, object]]:
    """``hf://name[:config][@split]`` streamed with ``datasets`` (network needed)."""
    import datasets

    name, _, split = spec[len(HUB_PREFIX) :].partition("@")
    name, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        yield from enumerate(stream, start=1)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise FileNotFoundError(
            f"{spec}: cannot stream this Hugging Face dataset ({type(err).__name__}: {err}). Without network access "
            "(or with HF_DATASETS_OFFLINE=1) point the source at local files instead."
        ) from None


def _raw_records(path: str) -> Iterator[tuple[int, object]]:
    """(line, parsed JSON value or the DataFormatError it raised) for one file (see the module docstring)."""
    if path.startswith(HUB_PREFIX):
        yield from _hub_rows(path)
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise DataFormatError(f"{path}:1: expected a JSON array of records, got {type(data).__name__}")
        yield from enumerate(data, start=1)
    elif path.endswith(".zst"):
        import pyarrow as pa

        with io.TextIOWrapper(pa.input_stream(path, compression="zstd"), encoding="utf-8") as handle:
            yield from _json_lines(handle, path)
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    elif path.endswith((".jsonl", ".txt")):
        with open(path, encoding="utf-8") as handle:
            yield from _json_lines(handle, path)
    else:
        raise DataFormatError(f"{path}: unsupported file type (expected .jsonl, .json, .jsonl.zst, .parquet, .txt)")


def raw_records(path: str) -> Iterator[tuple[int, object]]:
    """(line, parsed JSON value) of one file or ``hf://`` dataset, with no record format applied.

    A line that is not valid JSON comes back as the ``DataFormatError`` naming it; raise or count it.
    """
    yield from _raw_records(path)


def _need(raw: object, keys: tuple[str, ...], where: str, fmt: str) -> dict:
    if not isinstance(raw, dict):
        raise DataFormatError(f"{where}: expected a JSON object ({fmt} format), got {type(raw).__name__}")
    missing = [k for k in keys if not isinstance(raw.get(k), str)]
    if missing:
        raise DataFormatError(f"{where}: {fmt} record lacks string field(s) {missing}; has {sorted(raw)}")
    return raw


def _wudao(raw: object, where: str, **_) -> dict | None:
    r = _need(raw, ("title", "content"), where, "WuDao")
    return {"text": r["title"] + "\n\n" + r["content"]}


def _pile(raw: object, where: str, pile_sets: list[str] | None = None, **_) -> dict | None:
    r = _need(raw, ("text",), where, "PILE")
    if pile_sets is not None and (r.get("meta") or {}).get("pile_set_name") not in pile_sets:
        return None
    return {"text": r["text"]}


def _translation(raw: object, where: str, **_) -> dict | None:
    if isinstance(raw, dict) and isinstance(raw.get("translation"), dict):  # HF wmt19
        r = _need(raw["translation"], ("en", "zh"), where, "wmt19 translation")
        return {"en": r["en"], "zh": r["zh"]}
    r = _need(raw, ("en_text", "zh_text"), where, "translation {en_text, zh_text}")
    return {"en": r["en_text"], "zh": r["zh_text"]}


def _task(raw: object, where: str, **_) -> dict | None:
    r = _need(raw, ("input", "output"), where, "task {id, input, output, type}")
    return {"input": r["input"], "output": r["output"], "type": r.get("type")}


def _instruction(raw: object, where: str, **_) -> dict | None:
    if isinstance(raw, dict) and "response" in raw:  # Dolly 2.0
        r = _need(raw, ("instruction", "response"), where, "Dolly {instruction, context, response}")
        return {"instruction": r["instruction"], "input": r.get("context") or "", "output": r["response"]}
    r = _need(raw, ("instruction", "output"), where, "instruction {instruction, input, output}")
    return {"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}


READERS: dict[str, tuple[str, Callable[..., dict | None]]] = {  # format -> (record kind, parser)
    "wudao": ("text", _wudao),
    "pile": ("text", _pile),
    "translation": ("translation", _translation),
    "task": ("task", _task),
    "instruction": ("instruction", _instruction),
}


def record_kind(fmt: str) -> str:
    if fmt not in READERS:
        raise DataFormatError(f"unknown data format {fmt!r}; known formats: {sorted(READERS)}")
    return READERS[fmt][0]


def read_records(
    pattern: str | os.PathLike,
    fmt: str,
    what: str,
    stats: ReadStats | None = None,
    on_error: str = "raise",
    **options,
) -> Iterator[Record]:
    """Yield normalised records from every file that ``pattern`` names, in sorted file order.

    Args:
        pattern: a file, glob, directory or ``hf://`` dataset.
        fmt: a key of ``READERS``.
        what: the config key being read (for error messages), e.g. ``data.sources.zh.train``.
        stats: counters updated while reading.
        on_error: ``raise`` (default) stops at the first malformed record; ``skip`` counts it in ``stats`` and goes
            on (the caller reports the count).
        **options: reader options (``pile_sets`` for PILE).

    Raises:
        DataFormatError: naming file and line of the first malformed record (``on_error=raise``).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: expected raise or skip")
    record_kind(fmt)
    parse = READERS[fmt][1]
    stats = stats if stats is not None else ReadStats()
    for path in expand_paths(pattern, what):
        stats.files.append(path)
        for line, raw in _raw_records(path):
            where = f"{path}:{line}"
            try:
                if isinstance(raw, DataFormatError):
                    raise raw
                fields = parse(raw, where, **options)
            except DataFormatError as err:
                if on_error == "raise":
                    raise
                stats.skipped += 1
                if len(stats.skipped_examples) < 5:
                    stats.skipped_examples.append(str(err))
                continue
            if fields is None:
                stats.filtered += 1
                continue
            stats.read += 1
            yield Record(fields, path, line)
