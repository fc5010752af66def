"""Append-only JSON Lines files that survive a killed process: every write is one whole line, flushed at once."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path


def repair_tail(path: str | os.PathLike) -> int:
    """Cut a partial last line (a process killed mid-write) so the next append starts on a fresh line.

    Returns:
        The number of bytes removed (0 when the file ends with a newline, is empty or does not exist).
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        # scan back in blocks for the last newline
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return size - (start + cut + 1)
            end = start
        f.truncate(0)
        return size


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every complete JSON line of ``path``; a missing file yields nothing.

    Raises:
        ValueError: naming file and line when a complete line is not a JSON object (a partial last line, left by a
            killed writer, is skipped: call ``repair_tail`` before appending).
    """
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                return  # partial last line
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


class JsonlAppender:
    """A thread-safe append-only writer: one ``json.dumps`` line per call, flushed before ``write`` returns.

    Flushing hands the line to the operating system, so a killed process (SIGKILL, Ctrl-C, OOM) loses no line
    that ``write`` returned from; only a machine crash could, and that is not worth an fsync per record.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        self._lock = threading.Lock()

    def write(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
