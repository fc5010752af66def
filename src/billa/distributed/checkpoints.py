"""Checkpoints on disk: written whole or not at all, and only complete ones are resumed.

A single-file checkpoint is written in its destination directory under a temporary name
(``step=N.ckpt.tmp-<pid>``), flushed to disk, described by a manifest beside it (``step=N.ckpt.manifest.json``: size
and SHA-256), and only then renamed to ``step=N.ckpt``. Lightning's own writer builds the file in the system's
temporary directory and moves it, which across file systems is a copy: a full disk cuts it off under its final name.
A DeepSpeed checkpoint directory is written as ``step=N.ckpt.partial``, gets ``MANIFEST.json`` (every file's size and
SHA-256, ``billa.distributed.strategy``) and the ``COMPLETE`` marker, and is renamed.

At resume, sizes are always checked; SHA-256 only for checkpoints up to ``HASH_CHECK_MAX_BYTES``. What a failed save
leaves (a cut-off or missing file) shows in the sizes already; hashing the ~80 GB ZeRO-3 checkpoint of a 7B model
would add minutes to every resume, while the recorded hashes stay in the manifests for a deliberate check
(``incomplete_reason(path, hash_limit=None)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from billa.utils.logging import get_logger

log = get_logger(__name__)

COMPLETE_MARKER = "COMPLETE"  # written last into a DeepSpeed checkpoint directory
DIRECTORY_MANIFEST = "MANIFEST.json"  # a DeepSpeed checkpoint directory's files: size and SHA-256
MANIFEST_SUFFIX = ".manifest.json"  # beside a single-file checkpoint: step=N.ckpt.manifest.json
PARTIAL_SUFFIX = ".partial"  # a DeepSpeed checkpoint directory being written
TMP_TAG = ".tmp-"  # a file being written: <final name>.tmp-<pid>
HASH_CHECK_MAX_BYTES = 4 * 2**30  # ~2-4 s of SHA-256 at resume; larger checkpoints are checked by size only
_CHUNK = 16 * 2**20

_STEP = re.compile(r"step=(\d+)")


class _DigestWriter:
    """A binary file that hashes and counts what ``torch.save`` writes through it."""

    def __init__(self, file: BinaryIO):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        written = self.file.write(data)
        self.sha256.update(memoryview(data)[:written])
        self.size += written
        return written

    def flush(self) -> None:
        self.file.flush()

    def digest(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256.hexdigest()}


def file_digest(path: str | os.PathLike, fsync: bool = False) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file; ``fsync`` first flushes it to disk (a file another process just wrote)."""
    sha256, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha256.hexdigest()}


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable (a crash after ``os.replace`` could otherwise undo it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_TAG}{os.getpid()}")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``data`` under ``path``, or nothing there: written beside it under a temporary name, flushed, renamed."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(manifest, indent=1) + "\n").encode())


def manifest_path(checkpoint: str | os.PathLike) -> Path:
    """The manifest of a single-file checkpoint: ``step=N.ckpt`` -> ``step=N.ckpt.manifest.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + MANIFEST_SUFFIX)


def save_file_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` that leaves either the whole checkpoint with its manifest, or no file of that name.

    The bytes go to ``<path>.tmp-<pid>`` in the same directory (hashed as they are written, no second read), are
    fsynced, the manifest is written, and the rename comes last. A failed write (``ENOSPC``) removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            writer = _DigestWriter(f)
            try:
                torch.save(checkpoint, writer)
            except RuntimeError as error:  # torch's zip writer hides a failed write (ENOSPC) behind its own at close
                if isinstance(error.__context__, OSError):
                    raise error.__context__ from error
                raise
            f.flush()
            os.fsync(f.fileno())
        write_manifest(manifest_path(path), {"global_step": checkpoint.get("global_step"), **writer.digest()})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local saves go through ``save_file_checkpoint`` (remote ones do not)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_file_checkpoint(checkpoint, path)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        if _is_local_file_protocol(path):
            manifest_path(path).unlink(missing_ok=True)


def _mismatch(files: dict[str, dict[str, Any]], root: Path, hash_limit: int | None) -> str | None:
    """Why the files under ``root`` differ from their manifest entries (``{relative path: {size, sha256}}``)."""
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} holds {size:,} bytes, the manifest records {entry['size']:,}"
    if hash_limit is not None and sum(entry["size"] for entry in files.values()) > hash_limit:
        return None  # sizes only (module docstring)
    for name, entry in files.items():
        if file_digest(root / name)["sha256"] != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def incomplete_reason(
    path: str | os.PathLike, require_manifest: bool = True, hash_limit: int | None = HASH_CHECK_MAX_BYTES
) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is.

    Args:
        path: a single-file checkpoint or a DeepSpeed checkpoint directory (a link is followed).
        require_manifest: a single file without a manifest is incomplete (found by ``resume=auto``); False accepts
            a non-empty one (a checkpoint named by ``ckpt_path``, e.g. from an older billa or another program).
            A DeepSpeed directory whose ``COMPLETE`` marker came without ``MANIFEST.json`` (an older billa) counts.
        hash_limit: SHA-256 checked up to this many bytes in all; None: always.
    """
    path = Path(path).resolve()
    name = path.name
    if name.endswith(PARTIAL_SUFFIX) or TMP_TAG in name:
        return "an unfinished save"
    if path.is_dir():
        if not (path / COMPLETE_MARKER).is_file():
            return f"no {COMPLETE_MARKER} marker: the save did not finish"
        manifest = path / DIRECTORY_MANIFEST
        return _mismatch(json.loads(manifest.read_text())["files"], path, hash_limit) if manifest.is_file() else None
    if not path.is_file():
        return "no such file"
    manifest = manifest_path(path)
    if manifest.is_file():
        return _mismatch({name: json.loads(manifest.read_text())}, path.parent, hash_limit)
    if require_manifest:
        return f"no {manifest.name}: cut off by a failed save, or written by an older billa (name it in ckpt_path)"
    return None if path.stat().st_size > 0 else "an empty file"


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint written whole: its manifest matches (sizes; hashes when small), or a DeepSpeed COMPLETE marker."""
    return incomplete_reason(path) is None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _STEP.search(Path(path).name)
    return int(match.group(1)) if match else None


def find_resume_checkpoint(directory: str | os.PathLike) -> str | None:
    """The complete checkpoint with the highest step in ``directory`` (``step=NNNNNN.ckpt``), or None.

    Every newer one passed over (a cut-off file, an unfinished ``.partial`` or ``.tmp-`` save) is named in a warning.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    entries = sorted(
        (
            (step, path)
            for path in directory.iterdir()
            if (step := checkpoint_step(path)) is not None
            and not path.is_symlink()
            and not path.name.startswith(".")
            and MANIFEST_SUFFIX not in path.name
        ),
        reverse=True,
    )
    for _, path in entries:
        reason = incomplete_reason(path)
        if reason is None:
            return str(path)
        log.warning("Skipping the incomplete checkpoint %s: %s", path, reason)
    return None


def resolve_ckpt_path(ckpt_path: str | None, resume: str | None, checkpoint_dir: str | os.PathLike) -> str | None:
    """``ckpt_path`` (a checkpoint, or a directory of them) wins; ``resume=auto`` looks in ``checkpoint_dir``.

    Both pick only complete checkpoints (``incomplete_reason``), newest first.

    Raises:
        FileNotFoundError: ``ckpt_path`` names nothing resumable (the message says what was looked for, or why the
            checkpoint it names is incomplete).
    """
    if ckpt_path:
        path = Path(ckpt_path)
        if path.is_file() or (path / COMPLETE_MARKER).is_file():
            reason = incomplete_reason(path, require_manifest=False)
            if reason is None:
                return str(path)
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: not a complete checkpoint ({reason})")
        for directory in (path, path / "checkpoints"):
            found = find_resume_checkpoint(directory)
            if found:
                return found
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path}: not a complete checkpoint, nor a directory holding step=*.ckpt checkpoints "
            f"(DeepSpeed checkpoint directories need the {COMPLETE_MARKER} marker billa writes after a finished save)"
        )
    if resume == "auto":
        return find_resume_checkpoint(checkpoint_dir)
    if resume not in (None, "never"):
        raise ValueError(f"resume={resume!r}: expected auto or null")
    return None
