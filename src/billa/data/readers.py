"""Readers: files in the formats users already have (docs/recipe.md, "Data") -> normalised records.

Each reader yields ``Record``s: a small dict in one of the record kinds the objectives understand, plus where it
came from (file, line) so that every later error can point at the input.

Files: ``.jsonl`` (also ``.txt``, as LogiQA ships it), ``.json`` arrays, ``.jsonl.zst`` (PILE's shards, streamed),
``.parquet`` (line = row number), globs and directories of shards, and ``hf://<dataset>[:<config>][@<split>]`` for a
Hugging Face hub dataset read in streaming mode (needs network; line = row number).

kinds and their fields:
    text:        {"text"}
    translation: {"en", "zh"}
    task:        {"input", "output", "type"}
    instruction: {"instruction", "input", "output"}, {"turns": [{"human", "assistant"}, ...]}, or a task record
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from billa.utils.errors import BillaError


class DataFormatError(BillaError, ValueError):
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
    empty: int = 0  # records whose text (or output) is empty or blank: nothing to train on, counted
    cut_long: int = 0  # records with a text field longer than ``max_chars``, cut to it before tokenising (kept)
    skipped_examples: list[str] = field(default_factory=list)  # the first few not used, "file:line: why"
    files: list[str] = field(default_factory=list)

    def counters(self, no_target: int = 0) -> dict:
        """The counters a tokenisation pass reports (its marker and the data report), with the records the objective
        dropped for having no target token left (``no_target``)."""
        return {
            "records": self.read,
            "filtered": self.filtered,
            "skipped_malformed": self.skipped,
            "empty_text": self.empty,
            "cut_long": self.cut_long,
            "skipped_examples": self.skipped_examples,
            "no_target_after_truncation": no_target,
        }


HUB_PREFIX = "hf://"


def expand_paths(pattern: str | os.PathLike | Sequence[str | os.PathLike], what: str) -> list[str]:
    """Files named by a path, a glob or a directory (its files, sorted), or by a list of those: the files any of them
    names, sorted and once each (``[pile/train/*.jsonl, pile/train/*.jsonl.zst]``: PILE's shards in either form, and
    neither a ``.zst.part`` download nor an index file). ``what`` names the config key for errors.

    In a list a glob may match nothing (one of the forms is absent), but a path without glob characters must exist:
    a mistyped file name in a list is an error, not a file silently left out. A symbolic link to a file that does not
    exist is an error naming it (not an ``os.stat`` failure later, without the key).
    """
    if isinstance(pattern, Sequence) and not isinstance(pattern, str):
        found: set[str] = set()
        for i, entry in enumerate(pattern):
            literal = not glob.has_magic(str(entry)) and not str(entry).startswith(HUB_PREFIX)
            found.update(_expand_one(entry, f"{what}[{i}]", missing_ok=not literal))
        if not found:
            raise FileNotFoundError(f"{what}: no file matches any of {[str(p) for p in pattern]}")
        return sorted(found)
    return _expand_one(pattern, what)


def _expand_one(pattern: str | os.PathLike, what: str, missing_ok: bool = False) -> list[str]:
    pattern = str(pattern)
    if pattern.startswith(HUB_PREFIX):
        return [pattern]
    if os.path.isdir(pattern):
        files = sorted(str(p) for p in Path(pattern).rglob("*") if _file_or_link(p) and not p.name.startswith("."))
    else:
        files = sorted(glob.glob(pattern))
    if not files and not missing_ok:
        raise FileNotFoundError(f"{what}: no file matches {pattern!r}")
    for path in files:
        if not os.path.exists(path):  # glob lists a link whose target is gone (lexists), open/stat would fail later
            raise FileNotFoundError(
                f"{what}: {path} is a symbolic link to {os.readlink(path)!r}, which does not exist (from {pattern!r})"
            )
    return files


def _file_or_link(path: Path) -> bool:
    """A file of a directory source: a regular file, or a symbolic link (a dangling one is reported, not skipped)."""
    return path.is_file() or (path.is_symlink() and not path.exists())


_BOM = "\ufeff"  # a UTF-8 byte-order mark (EF BB BF), which Windows editors write at the start of a file


def _json_lines(lines, path: str, first: int = 1) -> Iterator[tuple[int, object]]:
    """Parse lines (bytes, or already decoded str) numbered from ``first``; one that is not UTF-8 or not JSON becomes
    a DataFormatError. A byte-order mark at the start of the file (line 1) is dropped, as ``utf-8-sig`` reads it."""
    for number, line in enumerate(lines, start=first):
        if number == 1:
            line = line.removeprefix(_BOM.encode()) if isinstance(line, bytes) else line.removeprefix(_BOM)
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
        except UnicodeDecodeError as err:
            reason = f"byte {err.start} of the line: {err.reason}"
            yield number, DataFormatError(f"{path}:{number}: not valid UTF-8 ({reason})")
        except json.JSONDecodeError as err:
            yield number, DataFormatError(f"{path}:{number}: not valid JSON ({err.msg})")


def _json_array(path: str) -> Iterator[tuple[int, object]]:
    """Elements of a JSON array file; elements holding bytes that are not UTF-8 become DataFormatErrors."""
    raw = Path(path).read_bytes()
    bad = None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:  # keep the readable elements: bad bytes become lone surrogates, found below
        line = raw.count(b"\n", 0, err.start) + 1
        bad = f"not valid UTF-8 (first bad byte at offset {err.start}, line {line})"
        text = raw.decode("utf-8", errors="surrogateescape")
    text = text.removeprefix(_BOM)  # read as utf-8-sig: a byte-order mark is not part of the JSON
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        also = f"; the file is {bad}" if bad else ""
        raise DataFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg}){also}") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}:1: expected a JSON array of records, got {type(data).__name__}")
    for number, element in enumerate(data, start=1):
        if bad and _has_surrogates(element):
            yield number, DataFormatError(f"{path}:{number}: array element {number} is {bad}")
        else:
            yield number, element


def _has_surrogates(value: object) -> bool:
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"PK\x03\x04": "zip"}


def _zst_lines(path: str, start: int = 1, stop: int | None = None) -> Iterator[tuple[int, object]]:
    """Lines ``start`` to ``stop`` (exclusive; 1-based) of a ``.jsonl.zst`` stream, lines before ``start``
    decompressed but not parsed; damage ends the file with one DataFormatError after the readable lines."""
    import pyarrow as pa

    stream = pa.input_stream(path, compression="zstd")
    last = start - 1
    try:
        with io.BufferedReader(stream) as handle:
            lines = itertools.islice(handle, start - 1, None if stop is None else stop - 1)
            for last, value in _json_lines(lines, path, first=start):
                yield last, value
    except OSError as err:
        yield last + 1, zst_damage(path, last, err)


def zst_damage(path: str, last: int, err: OSError) -> DataFormatError:
    """The error of a ``.zst`` file that stops decompressing after line ``last`` (naming what it is, when known)."""
    with open(path, "rb") as raw:
        head = raw.read(6)
    kind = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
    hint = f": it is a {kind} file, not zstd" if kind else ""
    return DataFormatError(
        f"{path}:{last + 1}: corrupt zstd stream ({err}){hint}; {last} lines were read before the damage, "
        "the rest of the file is lost"
    )


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


def _parquet_rows(path: str, piece: Piece | None) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    groups = range(piece.start, piece.stop) if piece else range(parquet.metadata.num_row_groups)
    number = piece.first_line - 1 if piece else 0
    for batch in parquet.iter_batches(batch_size=4096, row_groups=list(groups)):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _raw_records(path: str, piece: Piece | None = None) -> Iterator[tuple[int, object]]:
    """(line, parsed JSON value or the DataFormatError it raised) for one file, or one piece of it (``plan_pieces``)."""
    if piece is not None and piece.unit == "file":
        piece = None
    if path.startswith(HUB_PREFIX):
        yield from _hub_rows(path)
    elif path.endswith(".json"):
        yield from _json_array(path)
    elif path.endswith(".zst"):
        yield from _zst_lines(path, piece.start, piece.stop) if piece else _zst_lines(path)
    elif path.endswith(".parquet"):
        yield from _parquet_rows(path, piece)
    elif path.endswith(LINE_FILES):
        with open(path, "rb") as handle:
            if piece is None:
                yield from _json_lines(handle, path)
            else:
                handle.seek(piece.start)
                yield from _json_lines(io.BytesIO(handle.read(piece.stop - piece.start)), path, piece.first_line)
    else:
        raise DataFormatError(f"{path}: unsupported file type (expected .jsonl, .json, .jsonl.zst, .parquet, .txt)")


# ---- pieces: work split below the file level -----------------------------------------------------------------
LINE_FILES = (".jsonl", ".txt")
PIECE_BYTES = 1 << 22  # ~4 MiB of input per piece: a few seconds of tokenisation on one core


@dataclass(frozen=True)
class Piece:
    """A contiguous part of one input file, the unit of work of the tokenisation pass.

    ``unit`` says what ``start``/``stop`` count: ``bytes`` (offsets of whole lines in a ``.jsonl``/``.txt`` file),
    ``row_groups`` (of a parquet file) or ``file`` (the whole file: ``.jsonl.zst`` streams, JSON arrays and
    ``hf://`` datasets). ``first_line`` numbers the piece's first
    record as the whole file would, so errors still name the file's line.
    """

    path: str
    index: int
    unit: str
    start: int = 0
    stop: int = 0
    first_line: int = 1
    size: int = 0  # input bytes it covers (compressed for .zst, approximate for row groups): progress and balance


def plan_pieces(path: str, piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """Split one input file into pieces of about ``piece_bytes`` of input, the same for every pass over it.

    The plan depends only on the file's bytes (never on the number of workers), so finished pieces of a killed pass
    are reused by the next one whatever its ``num_proc``. A ``.jsonl`` file is read once (counting lines); a
    ``.jsonl.zst`` stream is one piece, decompressed once by one worker (a piece cannot seek in the stream: each
    would decompress everything before it; stream sources, ``data.stream``, cut it into pieces as they read it);
    parquet splits at row groups; JSON arrays and ``hf://`` datasets are one piece.
    """
    if path.startswith(HUB_PREFIX) or not path.endswith((*LINE_FILES, ".zst", ".parquet")):
        return [Piece(path, 0, "file", size=0 if path.startswith(HUB_PREFIX) else os.path.getsize(path))]
    if path.endswith(".parquet"):
        return _parquet_pieces(path, piece_bytes)
    if path.endswith(".zst"):  # one worker decompresses it once, front to back (a piece cannot seek in the stream)
        return [Piece(path, 0, "file", size=os.path.getsize(path))]
    pieces, offset, line = [], 0, 1
    with open(path, "rb") as handle:
        while block := handle.read(piece_bytes):
            if not block.endswith(b"\n"):
                block += handle.readline()  # end the piece at a line end
            pieces.append(Piece(path, len(pieces), "bytes", offset, offset + len(block), line, len(block)))
            offset += len(block)
            line += block.count(b"\n")
    return pieces or [Piece(path, 0, "bytes", 0, 0, 1, 0)]


def _parquet_pieces(path: str, piece_bytes: int) -> list[Piece]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    size = os.path.getsize(path)
    pieces, first, row, start, taken = [], 1, 1, 0, 0
    for group in range(meta.num_row_groups):
        taken += meta.row_group(group).total_byte_size
        row += meta.row_group(group).num_rows
        if taken >= piece_bytes or group == meta.num_row_groups - 1:
            pieces.append(Piece(path, len(pieces), "row_groups", start, group + 1, first, taken))
            start, first, taken = group + 1, row, 0
    return pieces or [Piece(path, 0, "file", size=size)]


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


def _optional_str(r: dict, key: str, where: str, fmt: str) -> str:
    """A field that may be absent or null (then ""), else must be a string."""
    value = r.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: {fmt} record field {key!r} must be a string (or absent), got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return f"{type(value).__name__} {json.dumps(value, ensure_ascii=False, default=str)[:40]}"


def _wudao(raw: object, where: str, **_) -> dict | None:
    r = _need(raw, ("title", "content"), where, "WuDao")
    return {"text": r["title"] + "\n\n" + r["content"]}


def _pile(raw: object, where: str, pile_sets: list[str] | None = None, **_) -> dict | None:
    r = _need(raw, ("text",), where, "PILE")
    if pile_sets is not None:
        meta = r.get("meta") or {}
        if not isinstance(meta, dict):
            raise DataFormatError(f"{where}: PILE record field 'meta' must be an object, got {_kind(meta)}")
        if meta.get("pile_set_name") not in pile_sets:
            return None
    return {"text": r["text"]}


def _translation(raw: object, where: str, **_) -> dict | None:
    if isinstance(raw, dict) and isinstance(raw.get("translation"), dict):  # HF wmt19
        r = _need(raw["translation"], ("en", "zh"), where, "wmt19 translation")
        return {"en": r["en"], "zh": r["zh"]}
    r = _need(raw, ("en_text", "zh_text"), where, "translation {en_text, zh_text}")
    return {"en": r["en_text"], "zh": r["zh_text"]}


def _task(raw: object, where: str, **_) -> dict | None:
    fmt = "task {id, input, output, type}"
    r = _need(raw, ("input", "output"), where, fmt)
    return {"input": r["input"], "output": r["output"], "type": _optional_str(r, "type", where, fmt) or None}


def _turns(raw: dict, key: str, where: str) -> dict:
    """Multi-round dialogues: COIG ``{"instruction", "conversations": [{"question", "answer"}, ...]}`` (also
    ``chat``), or ShareGPT-style ``[{"from": "human"|"gpt", "value"}, ...]``, as
    ``{"turns": [{"human", "assistant"}, ...]}``.
    """
    rounds = raw[key]
    if not isinstance(rounds, list) or not rounds:
        raise DataFormatError(f"{where}: multi-round field {key!r} must be a non-empty list of turns")
    turns = []
    if all(isinstance(t, dict) and "from" in t for t in rounds):  # ShareGPT: alternate human / gpt messages
        speakers = [t.get("from") for t in rounds]
        if len(rounds) % 2 or speakers[::2] != ["human"] * (len(rounds) // 2):
            raise DataFormatError(f"{where}: {key!r} must alternate human/gpt messages, got {speakers}")
        pairs = [(h.get("value"), a.get("value")) for h, a in zip(rounds[::2], rounds[1::2], strict=True)]
    else:
        pairs = [(t.get("question"), t.get("answer")) if isinstance(t, dict) else (None, None) for t in rounds]
    for number, (question, answer) in enumerate(pairs, start=1):
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataFormatError(f"{where}: turn {number} of {key!r} lacks a string question and answer")
        turns.append({"human": question, "assistant": answer})
    instruction = _optional_str(raw, "instruction", where, "multi-round").strip()
    if instruction:  # COIG puts the scenario before the first question
        turns[0] = {**turns[0], "human": instruction + "\n" + turns[0]["human"]}
    return {"turns": turns}


def _instruction(raw: object, where: str, **_) -> dict | None:
    """Instruction and dialogue sets, recognised per record by their fields.

    - Alpaca / Alpaca-GPT4 / BiLLa / COIG leetcode: ``{"instruction", "input", "output"}`` (+ ``source``);
    - Dolly 2.0: ``{"instruction", "context", "response", "category"}``;
    - COIG translated: ``{"trans_instruction", "trans_input", "trans_output"}``;
    - COIG exam: ``{"textbox_q_instruction", "textbox_q_context", "textbox_question", "textbox_answer",
      "textbox_answer_analysis"}`` (the analysis, when present, precedes the answer);
    - multi-round dialogues (COIG ``conversations`` / ``chat``, ShareGPT ``conversations``): ``{"turns": [...]}``;
    - a stage-2 task record ``{"id", "input", "output", "type"}``: kept as a task, which the dialogue objective turns
      into a Human turn (task prompt + input) and an Assistant turn (output with its rationale).
    """
    if not isinstance(raw, dict):
        raise DataFormatError(f"{where}: expected a JSON object (instruction format), got {type(raw).__name__}")
    for key in ("conversations", "chat"):
        if key in raw:
            return _turns(raw, key, where)
    if "response" in raw:  # Dolly 2.0
        r = _need(raw, ("instruction", "response"), where, "Dolly {instruction, context, response}")
        context = _optional_str(r, "context", where, "Dolly")
        return {"instruction": r["instruction"], "input": context, "output": r["response"]}
    if "trans_instruction" in raw:  # COIG translated instructions
        r = _need(raw, ("trans_instruction", "trans_output"), where, "COIG {trans_instruction, trans_input, ...}")
        trans_input = _optional_str(r, "trans_input", where, "COIG translated")
        return {"instruction": r["trans_instruction"], "input": trans_input, "output": r["trans_output"]}
    if "textbox_question" in raw:  # COIG exam instructions
        r = _need(raw, ("textbox_question", "textbox_answer"), where, "COIG exam {textbox_question, textbox_answer}")
        instruction = _optional_str(r, "textbox_q_instruction", where, "COIG exam")
        context = _optional_str(r, "textbox_q_context", where, "COIG exam").strip()
        analysis = _optional_str(r, "textbox_answer_analysis", where, "COIG exam").strip()
        question = "\n".join(part for part in (context, r["textbox_question"].strip()) if part)
        answer = "\n".join(part for part in (analysis, r["textbox_answer"].strip()) if part)
        return {"instruction": instruction, "input": question, "output": answer}
    if "instruction" not in raw and "input" in raw and "output" in raw:  # a task record, as a dialogue
        return _task(raw, where)
    r = _need(raw, ("instruction", "output"), where, "instruction {instruction, input, output}")
    return {
        "instruction": r["instruction"],
        "input": _optional_str(r, "input", where, "instruction"),
        "output": r["output"],
    }


READERS: dict[str, tuple[str, Callable[..., dict | None]]] = {  # format -> (record kind, parser)
    "wudao": ("text", _wudao),
    "pile": ("text", _pile),
    "translation": ("translation", _translation),
    "task": ("task", _task),
    "instruction": ("instruction", _instruction),
}


READER_VERSION = 2  # bump when what the readers yield changes: tokenised shards keyed by it are rebuilt

# record kind -> groups of fields; a record needs a non-blank value in at least one field of every group
REQUIRED_TEXT: dict[str, tuple[tuple[str, ...], ...]] = {
    "text": (("text",),),
    "translation": (("en",), ("zh",)),
    "task": (("output",),),
    "instruction": (("output",), ("instruction", "input")),
}


def _empty_fields(fields: dict, kind: str) -> str | None:
    """The first required group with only empty or blank fields ("text", "instruction/input"), or None."""
    if "turns" in fields:  # a multi-round dialogue: every turn needs a question and an answer
        blank = [i for i, t in enumerate(fields["turns"], 1) if not t["human"].strip() or not t["assistant"].strip()]
        return f"turns {blank}" if blank else None
    for group in REQUIRED_TEXT.get(kind, ()):
        if not any(isinstance(fields.get(k), str) and fields[k].strip() for k in group):
            return "/".join(group)
    return None


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
            on (the caller reports the count). Records with empty text (``REQUIRED_TEXT``) are counted in
            ``stats.empty`` and left out under both settings.
        **options: reader options (``pile_sets`` for PILE).

    Raises:
        DataFormatError: naming file and line of the first malformed record (``on_error=raise``).
    """
    stats = stats if stats is not None else ReadStats()
    for path in expand_paths(pattern, what):
        yield from read_piece(Piece(path, 0, "file"), fmt, stats, on_error, **options)


def read_piece(
    piece: Piece, fmt: str, stats: ReadStats | None = None, on_error: str = "raise", **options
) -> Iterator[Record]:
    """``read_records`` for one piece of one file (``plan_pieces``; ``Piece(path, 0, "file")`` is the whole file)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: expected raise or skip")
    stats = stats if stats is not None else ReadStats()
    if piece.index == 0:
        stats.files.append(piece.path)
    yield from parse_records(_raw_records(piece.path, piece), piece.path, fmt, stats, on_error, **options)


def parse_records(
    items: Iterable[tuple[int, object]],
    path: str,
    fmt: str,
    stats: ReadStats,
    on_error: str = "raise",
    max_chars: int | None = None,
    **options,
) -> Iterator[Record]:
    """Records of ``fmt`` from (line, parsed JSON value or DataFormatError) pairs of one file (``read_piece``).

    ``max_chars`` (``record_char_bound(max_len)``): text fields longer than this are cut before anything tokenises
    them (``cut_long_text``), counted in ``stats.cut_long``; None keeps every field whole.
    """
    kind, parse = record_kind(fmt), READERS[fmt][1]
    for line, raw in items:
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
        if empty := _empty_fields(fields, kind):
            stats.empty += 1
            if len(stats.skipped_examples) < 5:
                stats.skipped_examples.append(f"{where}: empty {empty}")
            continue
        if max_chars is not None and (cut := cut_long_text(fields, max_chars)) is not None:
            fields = cut
            stats.cut_long += 1
        stats.read += 1
        yield Record(fields, path, line)


# ---- records longer than training can use ------------------------------------------------------------------------
MAX_PIECE_CHARS = 16  # SentencePiece's max_sentencepiece_length (its default; LLaMA's and billa's Chinese model's):
# no vocabulary piece spans more characters, so n characters of text encode to at least n / 16 tokens
_CONTENT = re.compile(r"\S")


def record_char_bound(max_len: int) -> int:
    """The characters of one text field an example of at most ``max_len`` tokens can use, with a margin: ``max_len``
    x 16 x 2 (32,768 for BiLLa's 1024).

    ``max_len`` tokens span at most ``max_len`` x 16 characters (``MAX_PIECE_CHARS``), so a field cut at twice that
    still fills the window, and the window ends ``max_len`` x 16 characters before the cut, out of reach of the few
    pieces around the cut that tokenise differently. Objectives keep the first ``max_len`` tokens (``[: max_len]``),
    so the cut leaves every example as it was; it only spares the tokenizer the rest (a 30 MB single-line record took
    37 s and 4.1 GB to encode whole).
    """
    return max_len * MAX_PIECE_CHARS * 2


def cut_long_text(fields: dict, max_chars: int) -> dict | None:
    """``fields`` with every string longer than ``max_chars`` cut (``_cut``; also inside ``turns``), or None when
    no string is that long."""
    changed = False

    def cut(value):
        nonlocal changed
        if isinstance(value, str) and len(value) > max_chars:
            short = _cut(value, max_chars)
            changed = changed or len(short) < len(value)
            return short
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, list):
            return [cut(v) for v in value]
        return value

    result = cut(fields)
    return result if changed else None


def _cut(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters of ``text``, kept so that what an objective makes of the field is unchanged.

    Objectives use a field as it is (plain LM) or stripped (dialogue turns: ``strip``; task input: ``rstrip``), so:
    leading whitespace counts apart (up to ``max_chars`` of it, then ``max_chars`` from the first non-blank
    character), and a cut inside a run of blanks that more text follows keeps that text's first character, so that
    ``rstrip`` removes no more than it would from the whole field.
    """
    start = _CONTENT.search(text)
    start = start.start() if start else len(text)
    kept = text[: min(start, max_chars)] + text[start : start + max_chars]
    if kept[-1:].isspace() and (more := _CONTENT.search(text, start + max_chars)):
        kept += more.group()
    return kept
