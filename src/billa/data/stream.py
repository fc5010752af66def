"""Language-model sources read as streams: in file order, tokenised piece by piece while the stage trains.

A stream source (``order: stream``, the default for ``text`` and ``translation`` sources) is read as BiLLa's own
training code reads its corpora: the sorted train files one after the other, each file's records in line order,
wrapping to the first file when the last one ends. A stage therefore reads a prefix of the stream, and knows exactly
where it stopped: ``data_state`` names the file and line of the last record read, and the next stage
(``data.streams_from``) starts right after it. Stage 2 never replays a record of stage 1 and needs no file counts.

Tokenisation follows the reader instead of preceding the run:

- A file is tokenised by one worker task that reads it once, front to back (a ``.jsonl.zst`` shard is decompressed
  once), and writes a *piece* (an Arrow file plus a JSON marker) every ``PIECE_BYTES`` of input lines. The piece
  boundaries depend only on the file's bytes, so a killed pass resumes at the first piece without a marker.
- ``Feeder`` (a thread of one process per node) keeps the file being read and the next one tokenised, in the order
  the mix reads them; the trainer's readers (``StreamSource``, in every rank and dataloader worker) wait for a
  piece's marker when they get ahead of it. A stage that reads two of thirty shards tokenises about three.
- Pieces stay in the cache (``<token_cache_dir>/<source>/<settings key>/stream/<file id>/``) for later runs,
  resumes and the next stage; several processes may tokenise the same file at once (a claim file tells the others to
  wait; every write is a rename of a complete file, so two writers leave identical pieces).

The pieces store what a row needs and no more (``encode_rows``): token ids as uint16 when the vocabulary fits
(uint32 otherwise), no label list (labels follow from the ids and the objective: a cut drawn per visit, a masked
prefix), and a translation record's two texts once: the prompt part of each direction x prompt variant is the same
token sequence for every record of a piece, kept once in the piece's marker; a record whose tokens do not split that
way keeps its variants explicitly. About 2 bytes a token.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path

from billa.data.cache import CLAIM_FRESH_S  # a claim not refreshed for this long belongs to a process that is gone
from billa.data.objectives import (
    IGNORE,
    Example,
    ObjectiveContext,
    Variants,
    record_rng,
    translation_choices,
)
from billa.data.readers import DataFormatError, ReadStats
from billa.utils.errors import BillaError, EmptyDataError
from billa.utils.logging import get_logger

log = get_logger(__name__)

STREAM_OBJECTIVES = ("conditional_generation", "causal_lm", "translation")
STREAM_FORMAT = "stream-2"  # bump when the piece schema changes: pieces keyed by it are rebuilt
STATE_FILE = "billa_data_state.json"  # beside an export: where each stream source stopped
PIECE_BYTES = 1 << 22  # input bytes per piece (decompressed for .zst)
WAIT_LOG_S = 60.0  # a reader waiting this long for a piece says so in the log
WANT_REFRESH_S = 10.0  # a waiting reader renews its "want" file this often


# ---- worker side: one file, front to back -------------------------------------------------------------------------
LINE_FILES = (".jsonl", ".txt", ".jsonl.zst")


def file_pieces(path: str, piece_bytes: int = PIECE_BYTES):
    """Yield ``(index, first_line, stop_line, items)`` for each piece of ``path``, reading the file once.

    A piece is every ``piece_bytes`` of input lines (decompressed for ``.jsonl.zst``), ending at a line end, so the
    boundaries depend only on the file's bytes. ``items`` are ``(line, parsed JSON or DataFormatError)`` for
    ``readers.parse_records``; a damaged zstd stream ends the file with one DataFormatError naming the line. A JSON
    array (or any other whole-file format) is one piece with ``stop_line`` None.
    """
    import io

    from billa.data.readers import _json_lines, _raw_records, zst_damage

    if path.endswith(".json"):  # a JSON array (WuDao's part files): parsed whole (fast), tokenised in pieces
        yield from _array_pieces(path, piece_bytes)
        return
    if not path.endswith(LINE_FILES):
        yield 0, 1, None, _raw_records(path)
        return
    if path.endswith(".zst"):
        import pyarrow as pa

        handle = io.BufferedReader(pa.input_stream(path, compression="zstd"))
    else:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    index, first, taken, line, lines = 0, 1, 0, 0, []
    with handle:
        try:
            for line, raw in enumerate(handle, start=1):
                lines.append(raw)
                taken += len(raw)
                if taken >= piece_bytes:
                    yield index, first, line + 1, _json_lines(lines, path, first)
                    index, first, taken, lines = index + 1, line + 1, 0, []
        except OSError as err:
            damage = zst_damage(path, line, err)
            yield index, first, line + 2, itertools.chain(_json_lines(lines, path, first), [(line + 1, damage)])
            return
    if lines or index == 0:
        yield index, first, line + 1, _json_lines(lines, path, first)


def _array_pieces(path: str, piece_bytes: int):
    """``file_pieces`` of a JSON array: every ``piece_bytes`` of its elements' text (string values, in characters),
    element numbers as lines, so the first piece of a 300 MB WuDao part is tokenised without the rest."""
    from billa.data.readers import _raw_records

    def size(value) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return sum(size(v) for v in value) if isinstance(value, list) else 8

    index, first, taken, items = 0, 1, 0, []
    number = 0
    for number, value in _raw_records(path):
        items.append((number, value))
        taken += 64 if isinstance(value, Exception) else size(value)
        if taken >= piece_bytes:
            yield index, first, number + 1, iter(items)
            index, first, taken, items = index + 1, number + 1, 0, []
    if items or index == 0:
        yield index, first, number + 1, iter(items)


def encode_rows(records: list, objective: str, ctx: ObjectiveContext, encode) -> tuple[dict, list | None, int]:
    """The compact columns of a chunk of records (see the module docstring), the piece's prompt parts, and the
    number of records dropped (no target token).

    Text: ``ids`` = BOS + text + EOS truncated to ``max_len`` (exactly ``objectives.variants``' ids). Translation:
    ``a``/``b`` = the English / Chinese text's ids, and per variant (``translation_choices`` order) the prompt part
    between source and target in ``middles`` (one list per piece); a record whose prefix ids are not its source's
    ids + that part keeps every variant's prefix and target ids in ``explicit``.
    """
    if objective != "translation":
        texts = [r.fields["text"] for r in records]
        encoded = encode(texts) if texts else []
        ids, lines, dropped = [], [], 0
        for record, tokens in zip(records, encoded, strict=True):
            row = [ctx.bos_id, *tokens, ctx.eos_id][: ctx.max_len]
            if len(row) < 2:
                dropped += 1
                continue
            ids.append(row)
            lines.append(record.line)
        return {"ids": ids, "line": lines}, None, dropped
    choices = translation_choices(ctx)
    wanted: dict[str, None] = {}
    plans = []
    for record in records:
        en, zh = record.fields["en"], record.fields["zh"]
        prefixes = [_translation_prefix(en if d == "en2zh" else zh, p, ctx) for _, d, p in choices]
        plans.append((en, zh, prefixes))
        for text in (en, zh, *prefixes):
            wanted[text] = None
    texts = list(wanted)
    table = dict(zip(texts, encode(texts), strict=True)) if texts else {}
    middles: list | None = None
    columns: dict = {"a": [], "b": [], "explicit": [], "line": []}
    for record, (en, zh, prefixes) in zip(records, plans, strict=True):
        a, b = table[en], table[zh]
        parts = []
        for (_, direction, _), prefix in zip(choices, prefixes, strict=True):
            source, target = (a, b) if direction == "en2zh" else (b, a)
            ids = table[prefix]
            parts.append((ids[len(source) :] if ids[: len(source)] == source else None, ids, target))
        if middles is None and all(m is not None for m, _, _ in parts):
            middles = [list(m) for m, _, _ in parts]
        regular = middles is not None and all(m == mid for (m, _, _), mid in zip(parts, middles, strict=True))
        if not any(_valid(len(ids) + len(target), len(ids), ctx.max_len) for _, ids, target in parts):
            continue  # as objectives.variants: no variant keeps a target token after truncation
        columns["a"].append(a)
        columns["b"].append(b)
        columns["explicit"].append(None if regular else [[len(ids), *ids, *target] for _, ids, target in parts])
        columns["line"].append(record.line)
    dropped = len(records) - len(columns["line"])
    return columns, middles, dropped


def _translation_prefix(source: str, prompt: str, ctx: ObjectiveContext) -> str:
    if ctx.translation_extra_newline:  # as objectives.translation_example
        return source.rstrip() + "\n" + prompt + "\n"
    return source + "\n" + prompt


def _valid(full_len_without_specials: int, prefix_len: int, max_len: int) -> bool:
    """Whether ``BOS + prefix + target + EOS`` truncated to ``max_len`` keeps a target token."""
    return min(full_len_without_specials + 2, max_len) > 1 + prefix_len


def _schema(objective: str, wide: bool):
    import pyarrow as pa

    ids = pa.list_(pa.uint32() if wide else pa.uint16())
    if objective == "translation":
        explicit = pa.list_(pa.list_(pa.uint32()))  # [prefix length, prefix ids..., target ids...] per variant
        return pa.schema([("a", ids), ("b", ids), ("explicit", explicit), ("line", pa.int32())])
    return pa.schema([("ids", ids), ("line", pa.int32())])  # a record's line (or JSON array element) in its file


def tokenise_file(
    path: str,
    settings,
    out_dir: str,
    piece_bytes: int = PIECE_BYTES,
    start_line: int = 1,
    *,
    worker,
    max_rows: int | None = None,
) -> dict:
    """Tokenise one file into ``out_dir/NNNNN.arrow`` pieces, each with its marker ``NNNNN.json``; the worker task.

    Pieces that already have a tokenised marker are skipped (a resumed pass); pieces that end before ``start_line``
    get a marker without rows (the next stage's start file: the lines stage 1 read are not tokenised again). The
    file's ``done.json`` records its number of pieces once the last one is written. ``worker``: the process's
    tokenizer and prompts (``tokenise._Worker``). ``max_rows``: stop after the piece that reaches this many rows
    (a validation split's first records), leaving the rest of the file unread.

    Returns:
        ``{"file", "pieces", "rows"}``: pieces read, rows in them (tokenised now or before).
    """
    import pyarrow as pa

    from billa.data.readers import parse_records, record_char_bound
    from billa.data.tokenise import tmp_suffix

    ctx = ObjectiveContext(
        encode=None,
        bos_id=worker.bos_id,
        eos_id=worker.eos_id,
        max_len=settings.max_len,
        prompts=worker.prompts,
        translation_extra_newline=settings.translation_extra_newline,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema = _schema(settings.objective, worker.vocab_size > 65536)
    count = total = 0
    for index, first, stop, items in file_pieces(path, piece_bytes):
        if max_rows is not None and total >= max_rows:
            return {"file": path, "pieces": count, "rows": total}
        count = index + 1
        marker = out / f"{index:05d}.json"
        done = json.loads(marker.read_text()) if marker.is_file() else None
        if done is not None and (done["rows"] is not None or (stop is not None and stop <= start_line)):
            total += done["rows"] or 0
            continue
        if stop is not None and stop <= start_line:
            _write_json(marker, {"first_line": first, "stop_line": stop, "rows": None}, tmp_suffix())
            continue
        stats = ReadStats()
        if index == 0:
            stats.files.append(path)
        records = parse_records(
            items,
            path,
            settings.fmt,
            stats,
            settings.on_error,
            max_chars=record_char_bound(settings.max_len),  # a 30 MB one-line record costs no more than a window
            **dict(settings.reader_options),
        )
        rows = dropped = 0
        middles = None
        tmp = str(out / f"{index:05d}.arrow") + tmp_suffix()
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            while chunk := list(itertools.islice(records, 2000)):
                columns, chunk_middles, chunk_dropped = encode_rows(chunk, settings.objective, ctx, worker.encode)
                dropped += chunk_dropped
                if settings.objective == "translation":
                    if middles is None:
                        middles = chunk_middles
                    elif chunk_middles is not None and chunk_middles != middles:  # keep one table per piece
                        columns["explicit"] = _explicit_against(columns, middles, chunk_middles, ctx)
                if columns["line"]:
                    rows += len(columns["line"])
                    writer.write_batch(pa.record_batch([pa.array(columns[f.name], f.type) for f in schema], schema))
        os.replace(tmp, out / f"{index:05d}.arrow")
        total += rows
        _write_json(
            marker,
            {
                "first_line": first,
                "stop_line": stop,
                "rows": rows,
                "middles": middles,
                "stats": stats.counters(no_target=dropped),
            },
            tmp_suffix(),
        )
    _write_json(out / "done.json", {"pieces": count, "file": path}, tmp_suffix())
    return {"file": path, "pieces": count, "rows": total}


def _explicit_against(columns: dict, middles: list, chunk_middles: list, ctx) -> list:
    """A later chunk's regular rows made explicit when its prompt parts differ from the piece's table (never seen
    with sentencepiece tokenizers; kept exact anyway)."""
    choices = translation_choices(ctx)
    explicit = []
    for a, b, row in zip(columns["a"], columns["b"], columns["explicit"], strict=True):
        if row is not None:
            explicit.append(row)
            continue
        variants = []
        for (_, direction, _), middle in zip(choices, chunk_middles, strict=True):
            source, target = (a, b) if direction == "en2zh" else (b, a)
            variants.append([len(source) + len(middle), *source, *middle, *target])
        explicit.append(variants)
    return explicit


def _write_json(path: Path, data: dict, suffix: str) -> None:
    tmp = path.with_name(path.name + suffix)
    tmp.write_text(json.dumps(data, ensure_ascii=False))
    os.replace(tmp, path)


# ---- reader side ---------------------------------------------------------------------------------------------------
def stream_file_id(path: str) -> str:
    """A cache directory name for ``path``: its name, size and first and last 64 KiB (never a read of the whole file,
    so a 14 GB shard costs nothing before its first piece)."""
    from billa.data.cache import _sample_hash, fingerprint
    from billa.data.readers import HUB_PREFIX

    if path.startswith(HUB_PREFIX):  # a hub dataset: its name (and revision, when the spec pins one)
        return fingerprint(path)
    size = os.path.getsize(path)
    return fingerprint(Path(path).name, str(size), _sample_hash(path, size))


class StreamWaitError(BillaError, RuntimeError):
    """A piece did not appear: the tokenisation that should make it failed or stopped."""


class StreamSource:
    """One stream source as a sequence of rows: ``source.at(q)`` is the ``q``-th record this stage reads.

    Args:
        name: the source's name (``data.sources.<name>``).
        files: the stage's train files, sorted.
        settings: the ``ObjectiveSettings`` of the source (objective, max length, seed, ...).
        root: the source's stream directory in the cache (``<cache>/<source>/<key>/stream``).
        start: ``(file index, line)``: the first record read is the first at or after that line of that file; later
            epochs start at the first file.
        prompts: the prompt set (translation needs ``translation_choices``).
        bos_id, eos_id: special ids (translation rows are assembled at read time).
    """

    def __init__(self, name, files, settings, root, start, prompts, bos_id, eos_id, poll_s: float = 0.05):
        self.name, self.files, self.settings, self.root = name, list(files), settings, Path(root)
        self.start = start
        self.poll_s = poll_s
        self.ctx = ObjectiveContext(
            encode=None,
            bos_id=bos_id,
            eos_id=eos_id,
            max_len=settings.max_len,
            prompts=prompts,
            translation_extra_newline=settings.translation_extra_newline,
        )
        self._choices = translation_choices(self.ctx) if settings.objective == "translation" else None
        self._dirs: dict[int, Path] = {}
        # the stream so far: (epoch, file index, piece index, first row offset within the piece, rows, stream start)
        self._pieces: list[tuple[int, int, int, int, int, int]] = []
        self._cursor = (0, start[0], 0)  # next piece to look at: (epoch, file, piece)
        self._starts: list[int] = []  # stream row of each piece's first row
        self._rows = 0  # stream rows covered by self._pieces
        self._epoch_rows = 0  # rows found in the current epoch
        self._tables: OrderedDict = OrderedDict()
        self._markers: dict[tuple[int, int], dict] = {}
        self.feeding = False  # True in the feeder's copy

    def __getstate__(self):  # a dataloader worker re-opens the pieces it needs
        state = dict(self.__dict__)
        state["_tables"] = OrderedDict()
        return state

    def file_dir(self, file_index: int) -> Path:
        if file_index not in self._dirs:
            self._dirs[file_index] = self.root / stream_file_id(self.files[file_index])
        return self._dirs[file_index]

    # -- walking the piece sequence ----------------------------------------------------------------------------------
    def _marker(self, file_index: int, piece: int) -> dict | None:
        key = (file_index, piece)
        if key in self._markers:
            return self._markers[key]
        path = self.file_dir(file_index) / f"{piece:05d}.json"
        if not path.is_file():
            return None
        marker = json.loads(path.read_text())
        if marker["rows"] is not None:
            self._markers[key] = marker  # final: a tokenised piece never changes
        return marker

    def _pieces_in(self, file_index: int) -> int | None:
        done = self.file_dir(file_index) / "done.json"
        return json.loads(done.read_text())["pieces"] if done.is_file() else None

    def step(self, block: bool = True) -> bool:
        """Add the next piece of the stream to the known sequence; False when it is not ready (``block=False``)."""
        epoch, file_index, piece = self._cursor
        waited, warned, wanted_at = 0.0, False, -float("inf")
        while True:
            count = self._pieces_in(file_index)
            if count is not None and piece >= count:  # end of this file: the next file (or the next epoch)
                file_index, piece = file_index + 1, 0
                if file_index == len(self.files):
                    if self._epoch_rows == 0 and (epoch > 0 or self.start == (0, 1)):
                        raise EmptyDataError(
                            f"data.sources.{self.name}.train: no usable examples in its {len(self.files)} files "
                            f"({self.files[0]} ...)"
                        )
                    epoch, file_index, self._epoch_rows = epoch + 1, 0, 0
                self._cursor = (epoch, file_index, piece)
                continue
            marker = self._marker(file_index, piece)
            starts_here = epoch == 0 and file_index == self.start[0]
            if marker is not None and starts_here and _before(marker, self.start[1]):
                piece += 1  # a piece of the start file before the start line: not read in this epoch
                self._cursor = (epoch, file_index, piece)
                continue
            if marker is not None and marker["rows"] is not None:
                break
            self._check_failed(file_index)
            if not block:
                return False
            if time.monotonic() - wanted_at > WANT_REFRESH_S:  # tell the feeder (any process) what is waited for
                self._want(epoch, file_index)
                wanted_at = time.monotonic()
            time.sleep(self.poll_s)
            waited += self.poll_s
            if waited > WAIT_LOG_S and not warned:
                log.warning("%s: waiting for piece %d of %s to be tokenised", self.name, piece, self.files[file_index])
                warned = True
        if waited:
            self._want_path().unlink(missing_ok=True)
        first = self._first_row_at(file_index, piece, self.start[1]) if starts_here and self.start[1] > 1 else 0
        rows = marker["rows"] - first
        self._pieces.append((epoch, file_index, piece, first, rows, self._rows))
        self._starts.append(self._rows)
        self._rows += rows
        self._epoch_rows += rows
        self._cursor = (epoch, file_index, piece + 1)
        return True

    def _want_path(self) -> Path:
        return self.root / f"want-{socket.gethostname()}-{os.getpid()}.json"

    def _want(self, epoch: int, file_index: int) -> None:
        from billa.data.tokenise import tmp_suffix

        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self._want_path(), {"epoch": epoch, "file": file_index}, tmp_suffix())

    def wanted(self) -> list[tuple[int, int]]:
        """(epoch, file index) that readers (in any process) are waiting for now."""
        found = []
        for path in self.root.glob("want-*.json"):
            try:
                if time.time() - path.stat().st_mtime > 3 * WANT_REFRESH_S:  # its reader stopped waiting or died
                    path.unlink(missing_ok=True)
                    continue
                entry = json.loads(path.read_text())
                found.append((entry["epoch"], entry["file"]))
            except (OSError, ValueError):  # removed or being replaced meanwhile
                continue
        return found

    def _check_failed(self, file_index: int) -> None:
        if self.feeding:  # the feeder's own copy: it retries the file instead
            return
        failed = self.file_dir(file_index) / "failed.json"
        if failed.is_file():
            raise StreamWaitError(json.loads(failed.read_text())["error"])

    def _first_row_at(self, file_index: int, piece: int, line: int) -> int:
        import numpy as np

        lines = self._table(file_index, piece).column("line").to_numpy()
        return int(np.searchsorted(lines, line, side="left"))

    def _table(self, file_index: int, piece: int):
        import pyarrow as pa

        key = (file_index, piece)
        if key not in self._tables:
            path = str(self.file_dir(file_index) / f"{piece:05d}.arrow")
            with pa.ipc.open_stream(pa.memory_map(path)) as reader:
                self._tables[key] = reader.read_all()
            while len(self._tables) > 8:  # sequential reading: a few open pieces per source
                self._tables.popitem(last=False)
        self._tables.move_to_end(key)
        return self._tables[key]

    def locate(self, q: int, block: bool = True) -> tuple[int, int, int, int] | None:
        """(epoch, file index, piece, row within the piece) of stream row ``q``; None if not ready (``block=False``)."""
        while self._rows <= q:
            if not self.step(block):
                return None
        import bisect

        i = bisect.bisect_right(self._starts, q) - 1
        epoch, file_index, piece, first, _, start = self._pieces[i]
        return epoch, file_index, piece, first + q - start

    # -- rows ------------------------------------------------------------------------------------------------------
    def at(self, q: int) -> dict:
        """Row ``q`` of this stage's stream as ``{"input_ids", "labels"}``, its random choices drawn for its epoch."""
        epoch, file_index, piece, row = self.locate(q)
        table = self._table(file_index, piece)
        line = int(table.column("line")[row].as_py())
        rng = record_rng(self.settings.seed, self.name, f"{Path(self.files[file_index]).name}:{line}", epoch)
        example = self.variants(table, row, self._markers[(file_index, piece)]).draw(rng)
        return {"input_ids": example.input_ids, "labels": example.labels}

    def record_id(self, q: int) -> tuple[str, int, int]:
        """(file name, line, epoch) of stream row ``q``: what the data state and the tests compare."""
        epoch, file_index, piece, row = self.locate(q)
        line = int(self._table(file_index, piece).column("line")[row].as_py())
        return Path(self.files[file_index]).name, line, epoch

    def variants(self, table, row: int, marker: dict) -> Variants:
        if self._choices is None:
            ids = table.column("ids")[row].values.to_numpy().tolist()
            return Variants((Example(ids, list(ids)),), (1.0,), cut=self.settings.objective == "conditional_generation")
        explicit = table.column("explicit")[row]
        if explicit.is_valid:
            parts = [(v[1 : 1 + v[0]], v[1 + v[0] :]) for v in (x.values.to_numpy().tolist() for x in explicit.values)]
        else:
            a = table.column("a")[row].values.to_numpy().tolist()
            b = table.column("b")[row].values.to_numpy().tolist()
            parts = []
            for (_, direction, _), middle in zip(self._choices, marker["middles"], strict=True):
                source, target = (a, b) if direction == "en2zh" else (b, a)
                parts.append((source + middle, target))
        pairs = []
        for (weight, _, _), (prefix, target) in zip(self._choices, parts, strict=True):
            ids = [self.ctx.bos_id, *prefix, *target, self.ctx.eos_id][: self.ctx.max_len]
            n_prefix = 1 + len(prefix)
            if len(ids) > n_prefix:
                pairs.append((weight, Example(ids, [IGNORE] * n_prefix + ids[n_prefix:])))
        total = sum(w for w, _ in pairs)
        return Variants(tuple(e for _, e in pairs), tuple(w / total for w, _ in pairs))

    def stats(self) -> dict:
        """Read counters of the distinct pieces this process has read so far (the stream is tokenised as it is read):
        ``records`` read from them, ``examples`` made of them."""
        from billa.data.cache import sum_stats

        seen = [m["stats"] for m in self._markers.values()]
        totals = sum_stats(seen, examples_each=2, examples_kept=5)
        rows = sum(m["rows"] for m in self._markers.values())
        totals.update(files=len(self.files), streamed=True, pieces_seen=len(seen), examples=rows)
        return totals


def _before(marker: dict, line: int) -> bool:
    return marker["stop_line"] is not None and marker["stop_line"] <= line


# ---- the feeder: tokenise what the stage will read next ------------------------------------------------------------
class Feeder:
    """Keeps every stream source tokenised one file ahead of its readers, on ``num_proc`` worker processes.

    ``position()`` returns the stage's consumed samples (the trainer's step x global batch; ``total`` is the stage's
    length); ``need(name, samples)``
    maps that to the source's stream row. The feeder walks its own ``StreamSource`` copies to that row and makes sure
    the file holding it and the next file are tokenised (or being tokenised, here or by another process that holds
    the file's claim). Errors of a worker are written to the file's ``failed.json``, which every reader raises.
    """

    def __init__(
        self,
        sources: dict[str, StreamSource],
        need,
        position,
        spec,
        prompts,
        num_proc: int,
        total: int,
        piece_bytes: int = PIECE_BYTES,
        ahead_files: int = 1,
    ):
        self.sources, self.need, self.position = sources, need, position
        for source in sources.values():
            source.feeding = True
        self.spec, self.prompts, self.total = spec, prompts, total
        # at least one worker per source: a task is a whole file, so with fewer workers one source's first piece would
        # wait for another source's whole file
        self.num_proc, self.piece_bytes, self.ahead_files = max(1, num_proc, len(sources)), piece_bytes, ahead_files
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: dict[tuple[str, int], Path] = {}  # (source, file index) -> claim file
        self._host = f"{socket.gethostname()}-{os.getpid()}"

    def start(self) -> Feeder:
        self._thread = threading.Thread(target=self._run, name="billa-feeder", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _wanted(self) -> list[tuple[int, str, int, int]]:
        """(urgency, source, file index, start line) of every file to tokenise now, most urgent first: files a reader
        waits for (-1), the file holding each source's next needed row (0) and the ``ahead_files`` after it."""
        samples = self.position()
        wanted = []
        for name, source in self.sources.items():
            q = self.need(name, samples)
            where = source.locate(q, block=False)  # walks, without waiting, as far as the pieces allow
            epoch, file_index = (where[0], where[1]) if where is not None else source._cursor[:2]
            for ahead in range(self.ahead_files + 1):
                e, f = divmod(file_index + ahead, len(source.files))
                e += epoch
                first = source.start[1] if e == 0 and f == source.start[0] else 1
                wanted.append((ahead, name, f, first))
            for e, f in source.wanted():  # a reader further ahead than the trainer (prefetching, inspect)
                wanted.append((-1, name, f, source.start[1] if e == 0 and f == source.start[0] else 1))
        return sorted(wanted, key=lambda w: w[0])  # waited for, then the files being read, then the next ones

    def _finished(self) -> bool:
        """Whether every source has its rows for the stage's last sample (the feeder's work is done)."""
        return all(s.locate(self.need(n, self.total), block=False) is not None for n, s in self.sources.items())

    def _claim(self, source: StreamSource, file_index: int) -> Path | None:
        """This process's claim on a file, or None when another live process holds it."""
        directory = source.file_dir(file_index)
        directory.mkdir(parents=True, exist_ok=True)
        claim = directory / "claim"
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                age = time.time() - claim.stat().st_mtime
            except FileNotFoundError:
                return None
            if age < CLAIM_FRESH_S:
                return None
            claim.unlink(missing_ok=True)  # its owner stopped refreshing it: take over
            return self._claim(source, file_index)
        with os.fdopen(fd, "w") as handle:
            handle.write(self._host)
        (directory / "failed.json").unlink(missing_ok=True)  # an earlier failure is retried
        return claim

    def _complete(self, source: StreamSource, file_index: int, first_line: int) -> bool:
        """Whether a file's pieces from ``first_line`` on are all tokenised."""
        count = source._pieces_in(file_index)
        if count is None:
            return False
        for piece in range(count):
            marker = source._marker(file_index, piece)
            if marker is None or marker["rows"] is None and not _before(marker, first_line):
                return False
        return True

    def _run(self) -> None:
        from billa.data.tokenise import WorkerPool

        try:
            with WorkerPool(self.num_proc, self.spec, self.prompts) as pool:
                while not self._stop.is_set():
                    for claim in self._inflight.values():
                        os.utime(claim)  # still alive
                    busy = len(self._inflight)
                    for _, name, file_index, first in self._wanted():
                        if busy >= self.num_proc:
                            break
                        source = self.sources[name]
                        if (name, file_index) in self._inflight or self._complete(source, file_index, first):
                            continue
                        claim = self._claim(source, file_index)
                        if claim is None:
                            continue
                        path = source.files[file_index]
                        task = (
                            "stream",
                            path,
                            source.settings,
                            str(source.file_dir(file_index)),
                            self.piece_bytes,
                            first,
                        )
                        pool.submit(task)
                        self._inflight[(name, file_index)] = claim
                        busy += 1
                    self._collect(pool, timeout=0.2 if self._inflight else 0.5)
                    if not self._inflight and self._finished():
                        log.info("Stream sources: everything this stage reads is tokenised")
                        return
        except BaseException as err:  # noqa: BLE001 - handed to the readers through failed.json and self.error
            self.error = err
            log.error("Tokenisation stopped: %s", err)
        finally:
            for claim in self._inflight.values():
                claim.unlink(missing_ok=True)

    def _collect(self, pool, timeout: float) -> None:
        if not self._inflight:
            self._stop.wait(timeout)
            return
        try:
            done = pool.next_result(timeout=timeout)
        except Exception as err:
            task = getattr(err, "billa_task", None)
            for name, file_index in list(self._inflight):
                source = self.sources[name]
                if task is None or source.files[file_index] == task[1]:
                    _write_json(
                        source.file_dir(file_index) / "failed.json",
                        {"error": str(err).split("\n")[0]},
                        f".tmp-{self._host}",
                    )
            raise
        if done is None:
            return
        task, result = done
        for key, claim in list(self._inflight.items()):
            if self.sources[key[0]].files[key[1]] == task[1] and str(self.sources[key[0]].file_dir(key[1])) == task[3]:
                claim.unlink(missing_ok=True)
                del self._inflight[key]
                source = self.sources[key[0]]
                log.info(
                    "tokenised %s: %s (file %d of %d, %d pieces, %d examples)",
                    key[0],
                    Path(task[1]).name,
                    key[1] + 1,
                    len(source.files),
                    result["pieces"],
                    result["rows"],
                )


def state_of(source: StreamSource, rows_read: int) -> dict:
    """Where ``source`` stopped after ``rows_read`` rows of this stage: the file and line of the last record read."""
    if rows_read == 0:
        name = Path(source.files[source.start[0]]).name
        return {"file": name, "after_line": source.start[1] - 1, "epoch": 0, "records_read": 0}
    file_name, line, epoch = source.record_id(rows_read - 1)
    return {"file": file_name, "after_line": line, "epoch": epoch, "records_read": rows_read}


def start_of(state_path: str, name: str, files: list[str], entry: dict) -> tuple[int, int]:
    """This stage's ``(file index, line)`` start for ``name`` from a data-state entry: the record after the last one
    read. Raises ConfigError (naming the state file and the source's key) when the file is not among ``files``."""
    from billa.config import ConfigError

    names = [Path(f).name for f in files]
    if entry["file"] not in names:
        raise ConfigError(
            f"{state_path}: source {name!r} stopped in file {entry['file']!r}, which is not among the "
            f"{len(files)} files of data.sources.{name}.train ({names[0]} ... {names[-1]}). Point "
            f"data.sources.{name}.train at the corpus the previous stage read, or start at its first file with "
            "data.streams_from=null."
        )
    return names.index(entry["file"]), int(entry["after_line"]) + 1


__all__ = [
    "DataFormatError",
    "Feeder",
    "STATE_FILE",
    "STREAM_OBJECTIVES",
    "StreamSource",
    "encode_rows",
    "file_pieces",
    "start_of",
    "state_of",
    "tokenise_file",
]
