"""The tokenisation pass's unit of work, and the worker processes that run it.

A piece of an input file (``readers.plan_pieces``: about 4 MiB of lines, a row group range, or a whole JSON array)
becomes one Arrow stream holding every variant of each of its records (``objectives.variants``), with one batched
encode per chunk of records. ``cache.tokenize_source`` plans the pieces, hands them to ``WorkerPool`` (or runs them
in-process for ``num_proc=1``) and joins each file's pieces into its shard.

Workers are fresh interpreters running ``python -m billa.data.tokenise``: they import only this module, the readers,
the objectives, pyarrow and the ``tokenizers`` library (about 0.3 s), and encode with the exact backend tokenizer the
driver loaded through transformers (``tokenizer_spec``). A ``multiprocessing`` spawn pool would instead re-import the
caller's ``__main__`` (``train.py``: lightning, transformers, torch; about 6 s per worker), and forking a process
that already runs threads (gloo, a DataLoader, tokenizers' own pool) can deadlock.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from billa.data.objectives import ObjectiveContext, unmapped_type, variants
from billa.data.readers import DataFormatError, Piece, ReadStats, plan_pieces, read_piece, record_char_bound

CHUNK = 2000  # records tokenised together (one batched encode, one Arrow record batch)


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
    prompt_language: str = "match"  # data.prompt_language (task and dialogue objectives)


def tokenizer_spec(tokenizer) -> dict:
    """What a worker needs to encode exactly as ``tokenizer`` (a loaded transformers tokenizer) does.

    Fast tokenizers travel as their backend's JSON (``tokenizer(texts, add_special_tokens=False)`` is that backend's
    ``encode_batch``); a tokenizer without one travels as its directory and is loaded with transformers.
    """
    spec = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return {**spec, "json": backend.to_str()}
    return {**spec, "dir": tokenizer.name_or_path}


class _Worker:
    """The tokenizer and prompts of this process (one per worker; the driver's own for ``num_proc=1``)."""

    def __init__(self, spec: dict, prompts: dict[str, list[str]]):
        self.bos_id, self.eos_id, self.prompts = spec["bos_id"], spec["eos_id"], prompts
        self.vocab_size = spec.get("vocab_size", 1 << 32)
        if "json" in spec:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(spec["json"])
            self.encode = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            from billa.tokenizer.load import load_tokenizer

            tokenizer = load_tokenizer(spec["dir"])
            self.encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


_STATE: dict = {}


def init(spec: dict, prompts: dict[str, list[str]]) -> None:
    _STATE["worker"] = _Worker(spec, prompts)


UNMAPPED = "unmapped_type/"  # counter prefix: task records of a type with no prompt file, per type


def count_unmapped_types(records: list, settings: ObjectiveSettings, ctx: ObjectiveContext, counts: dict) -> None:
    """Count task records whose ``type`` has no prompt file (``objectives.unmapped_type``) into ``counts``.

    Raises:
        DataFormatError: with ``data.on_error=raise``, at the first such record, naming file, line and the fix.
    """
    if settings.objective not in ("task", "dialogue"):
        return
    for record in records:
        kind = record.fields.get("type")
        if "input" not in record.fields or not unmapped_type(kind, ctx):
            continue
        if settings.on_error == "raise":
            raise DataFormatError(
                f"{record.where}: task type {kind!r} has no prompt file: add `data.prompt_types.{kind}: "
                f"<stem>` (a stem with <stem>.pre.prompt / <stem>.post.prompt in data.prompts_dir) or a "
                f"{kind}.pre.prompt / {kind}.post.prompt file; data.on_error=skip trains such records without a prompt "
                "(BiLLa's rule) and counts them per type in the data report"
            )
        counts[UNMAPPED + kind] = counts.get(UNMAPPED + kind, 0) + 1


def _encode_chunk(records: list, settings: ObjectiveSettings, ctx: ObjectiveContext, encode) -> tuple[list, int]:
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
    encoded = dict(zip(texts, encode(texts), strict=True)) if texts else {}
    ctx.encode = encoded.__getitem__
    examples, dropped = [], 0
    for record in records:
        found = variants(settings.objective, record.fields, ctx)
        if found is None:
            dropped += 1
        else:
            examples.append((found, record.line))
    return examples, dropped


def schema():
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


def tokenize_piece(piece: Piece, settings: ObjectiveSettings, out: str) -> dict:
    """Tokenise one piece into the Arrow stream ``out`` (written under a temporary name, renamed when complete).

    Returns:
        ``{"examples": n, "stats": {...}}``: the read counters of ``readers.ReadStats`` plus the records the objective
        dropped (``no_target_after_truncation``).
    """
    import pyarrow as pa

    worker: _Worker = _STATE["worker"]
    ids_type = pa.list_(pa.list_(pa.int32()))
    ctx = ObjectiveContext(
        encode=None,
        bos_id=worker.bos_id,
        eos_id=worker.eos_id,
        max_len=settings.max_len,
        prompts=worker.prompts,
        translation_extra_newline=settings.translation_extra_newline,
        prompt_types=dict(settings.prompt_types),
        prompt_language=settings.prompt_language,
    )
    stats = ReadStats()
    unmapped: dict[str, int] = {}
    n_examples = dropped = 0
    bound = record_char_bound(settings.max_len)  # a 30 MB one-line record costs no more than a window
    records = read_piece(
        piece, settings.fmt, stats, settings.on_error, max_chars=bound, **dict(settings.reader_options)
    )
    tmp, table_schema = out + tmp_suffix(), schema()
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, table_schema) as writer:
        while chunk := list(itertools.islice(records, CHUNK)):
            count_unmapped_types(chunk, settings, ctx, unmapped)
            examples, chunk_dropped = _encode_chunk(chunk, settings, ctx, worker.encode)
            dropped += chunk_dropped
            n_examples += len(examples)
            if examples:
                columns = [
                    pa.array([[e.input_ids for e in v.examples] for v, _ in examples], ids_type),
                    pa.array([[e.labels for e in v.examples] for v, _ in examples], ids_type),
                    pa.array([list(v.weights) for v, _ in examples], pa.list_(pa.float64())),
                    pa.array([v.cut for v, _ in examples], pa.bool_()),
                    pa.array([line for _, line in examples], pa.int64()),
                ]
                writer.write_batch(pa.record_batch(columns, schema=table_schema))
    os.replace(tmp, out)
    result = {
        "examples": n_examples,
        "stats": {**stats.counters(no_target=dropped), **unmapped},
    }
    marker = Path(out).with_suffix(".json")
    marker_tmp = marker.with_name(marker.name + tmp_suffix())
    marker_tmp.write_text(json.dumps(result))
    os.replace(marker_tmp, marker)  # the piece is done once its marker exists
    return result


def tmp_suffix() -> str:
    """Suffix of this process's temporary files: whose they are, so ``cache.remove_stale_temp`` can clean up."""
    return f".tmp-{socket.gethostname()}-{os.getpid()}"


def run_task(task: tuple):
    """``("plan", path, piece_bytes)`` -> pieces; ``("piece", piece, settings, out)`` -> ``tokenize_piece``'s dict;
    ``("stream", path, settings, out_dir, piece_bytes, start_line)`` -> ``stream.tokenise_file``'s dict."""
    kind, *args = task
    if kind == "plan":
        return plan_pieces(*args)
    if kind == "piece":
        return tokenize_piece(*args)
    if kind == "stream":
        from billa.data.stream import tokenise_file

        return tokenise_file(*args, worker=_STATE["worker"])
    raise ValueError(f"unknown tokenisation task {kind!r}")


# ---- worker processes --------------------------------------------------------------------------------------------
def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def _serve() -> None:
    """A worker's loop: answer each task read from stdin on the original stdout; everything printed goes to stderr."""
    try:  # spare cores: while the stage trains (stream sources), the trainer's processes come first
        os.nice(10)
    except OSError:
        pass
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library printing to stdout must not corrupt the replies
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    while True:
        try:
            task = _receive(requests)
        except EOFError:  # the driver closed the pipe (done, or it died)
            return
        try:
            reply = ("ok", init(*task[1:]) if task[0] == "init" else run_task(task))
        except Exception as err:  # noqa: BLE001 - every failure goes back to the driver, which raises it
            reply = ("error", err, traceback.format_exc())
        try:
            _send(replies, reply)
        except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle
            _send(replies, ("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}"), reply[2]))


class InProcess:
    """Runs tasks one at a time in this process: ``WorkerPool``'s interface for ``num_proc=1``."""

    def __init__(self, spec: dict, prompts: dict[str, list[str]]):
        init(spec, prompts)
        self.queue: deque = deque()
        self.slots = 1  # tasks worth handing over at once: more would only wait in the queue

    def submit(self, task: tuple) -> None:
        self.queue.append(task)

    def next_result(self, timeout: float | None = None) -> tuple[tuple, object] | None:
        """(task, result) of the next task; None when none is left."""
        if not self.queue:
            return None
        task = self.queue.popleft()
        return task, run_task(task)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerPool(InProcess):
    """``num_proc`` worker processes; each task goes to whichever worker is idle, results come back as they finish.

    A failed task raises its exception here (with the worker's traceback as a note); a worker that dies (killed,
    out of memory) raises a RuntimeError naming the task. Leaving the ``with`` block ends every worker.
    """

    def __init__(self, num_proc: int, spec: dict, prompts: dict[str, list[str]]):
        self.queue, self.slots = deque(), num_proc
        src = str(Path(__file__).resolve().parents[2])  # the directory holding the billa package
        env = {
            **os.environ,
            "TOKENIZERS_PARALLELISM": "false",  # one core per worker: the pool is what scales
            "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        }
        self.workers = [
            subprocess.Popen(
                [sys.executable, "-m", "billa.data.tokenise"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
            )
            for _ in range(num_proc)
        ]
        self.busy: dict[subprocess.Popen, tuple] = {}
        self.idle: list[subprocess.Popen] = []
        for worker in self.workers:
            self._assign(worker, ("init", spec, prompts))

    def _assign(self, worker: subprocess.Popen, task: tuple) -> None:
        self.busy[worker] = task
        _send(worker.stdin, task)

    def submit(self, task: tuple) -> None:
        if self.idle:
            self._assign(self.idle.pop(), task)
        else:
            self.queue.append(task)

    def next_result(self, timeout: float | None = None) -> tuple[tuple, object] | None:
        """(task, result) of the next finished task; None when none is busy, or none finished within ``timeout``."""
        from multiprocessing.connection import wait

        while self.busy:
            ready = wait([w.stdout for w in self.busy], timeout)
            if not ready:
                return None
            worker = next(w for w in self.busy if w.stdout in ready)
            task = self.busy.pop(worker)
            try:
                status, *reply = _receive(worker.stdout)
            except EOFError:
                code = worker.wait()
                what = {
                    "init": "starting (its error output is above)",
                    "plan": f"planning the pieces of {task[1]}",
                    "piece": f"tokenising {getattr(task[1], 'path', '')} (piece {getattr(task[1], 'index', '')})",
                    "stream": f"tokenising {task[1]}",
                }[task[0]]
                raise RuntimeError(
                    f"a tokenisation worker died (exit code {code}; -9 is SIGKILL, often out of memory) while {what}"
                ) from None
            if status == "error":
                err, trace = reply
                if hasattr(err, "add_note"):
                    err.add_note(f"in tokenisation worker {worker.pid}:\n{trace}")
                err.billa_task = task
                raise err
            if self.queue:
                self._assign(worker, self.queue.popleft())
            else:
                self.idle.append(worker)
            if task[0] != "init":
                return task, reply[0]
        return None

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.stdin.close()
            except OSError:
                pass
            if worker in self.busy:  # mid-task after an error elsewhere: no need to finish it
                worker.kill()
        for worker in self.workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            worker.stdout.close()


if __name__ == "__main__":
    _serve()
