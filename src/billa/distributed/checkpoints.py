"""Finding the checkpoint to resume from: only complete ones count."""

from __future__ import annotations

import os
import re
from pathlib import Path

from billa.distributed.strategy import COMPLETE_MARKER, PARTIAL_SUFFIX

_STEP = re.compile(r"step=(\d+)")


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint file (written atomically by Lightning) or a DeepSpeed directory that holds the COMPLETE marker."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX) or path.name.startswith("."):
        return False
    if path.is_dir():
        return (path / COMPLETE_MARKER).is_file()
    return path.is_file() and path.stat().st_size > 0


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _STEP.search(Path(path).name)
    return int(match.group(1)) if match else None


def find_resume_checkpoint(directory: str | os.PathLike) -> str | None:
    """The complete checkpoint with the highest step in ``directory`` (``step=NNNNNN.ckpt``), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [
        (step, path)
        for path in directory.iterdir()
        if (step := checkpoint_step(path)) is not None and not path.is_symlink() and is_complete(path)
    ]
    return str(max(candidates)[1]) if candidates else None


def resolve_ckpt_path(ckpt_path: str | None, resume: str | None, checkpoint_dir: str | os.PathLike) -> str | None:
    """``ckpt_path`` (a checkpoint, or a directory of them) wins; ``resume=auto`` looks in ``checkpoint_dir``.

    Raises:
        FileNotFoundError: ``ckpt_path`` names nothing resumable (the message says what was looked for).
    """
    if ckpt_path:
        path = Path(ckpt_path)
        if is_complete(path):
            return str(path)
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
