"""Loading checkpoints without running their code.

A ``.pt`` / ``.ckpt`` file is a pickle: unpickled with ``weights_only=False`` it can call any function (a crafted
shard calling ``os.system`` runs on conversion or resume). DeepSpeed's consolidation and engine ``load_checkpoint``
call ``torch.load(weights_only=False)``. billa therefore

1. scans every pickle of a checkpoint before loading it (``torch.serialization.get_unsafe_globals_in_checkpoint``
   reads the opcodes, runs nothing) and refuses one that needs anything beyond tensors, plain Python types and the
   few DeepSpeed types ZeRO checkpoints hold (``ZERO_SAFE_GLOBALS``), naming the file and the type;
2. runs the load itself with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` and that allow-list, so every ``torch.load`` inside
   (DeepSpeed's included) is a weights-only load.

The only way to the unsafe path is the explicit trust flag (``op.trust_checkpoint=true`` for ``convert.py``,
``trust_checkpoint=true`` for resuming a run).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from billa.utils.errors import BillaError
from billa.utils.logging import get_logger

log = get_logger(__name__)

# The DeepSpeed objects a ZeRO checkpoint pickles besides tensors (measured on billa's ZeRO-3 checkpoints: the
# optimizer states hold the loss scaler and the ZeRO stage enum; fp16 runs use the dynamic loss scaler).
ZERO_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UntrustedCheckpointError(BillaError, ValueError):
    """A checkpoint file would run code (or types billa does not know) when loaded; the message names it."""


def _safe_globals() -> list:
    import importlib

    objects = []
    for name in ZERO_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        objects.append(getattr(importlib.import_module(module), attr))
    return objects


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The pickled files of a checkpoint: the file itself, or every ``*.pt`` / ``*.ckpt`` file under a directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for pattern in ("*.pt", "*.ckpt") for p in path.rglob(pattern) if p.is_file())


def check_checkpoint(path: str | os.PathLike, key: str, trust: bool = False, trust_key: str = "trust_checkpoint"):
    """Refuse a checkpoint whose pickles need more than tensors, plain types and ``ZERO_SAFE_GLOBALS``.

    Args:
        path: a checkpoint file or directory.
        key: the config key that named it (for the message).
        trust: skip the check (the user vouches for whoever wrote the checkpoint).
        trust_key: the config key that sets ``trust``.

    Raises:
        UntrustedCheckpointError: naming the file and the globals it would import or call.
    """
    if trust:
        log.warning("%s=%s: %s=true: loading with weights_only=False; its pickles may run code", key, path, trust_key)
        return
    for file in checkpoint_files(path):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except Exception as err:  # not a zip-format torch file: an old pickle or not a checkpoint at all
            raise UntrustedCheckpointError(
                f"{key}={path}: {file} is not a torch zip-format checkpoint that can be checked ({err}); "
                f"if you trust whoever wrote it, pass {trust_key}=true"
            ) from None
        refused = [name for name in unsafe if name not in ZERO_SAFE_GLOBALS]
        if refused:
            raise UntrustedCheckpointError(
                f"{key}={path}: {file} needs {refused} to load, which can run arbitrary code; billa loads only "
                f"tensors, plain Python types and DeepSpeed's {list(ZERO_SAFE_GLOBALS)}. Nothing was loaded. "
                f"If you trust whoever wrote this checkpoint, pass {trust_key}=true"
            )


def pretrained_weight_files(path: str | os.PathLike) -> list[Path]:
    """The pickled weight files ``from_pretrained`` would read from a local HF model directory.

    None when the directory has safetensors weights (transformers prefers them and unpickles nothing) or is not a
    local directory (a hub id: transformers resolves it); else its ``pytorch_model*.bin`` files.
    """
    directory = Path(path)
    if not directory.is_dir() or any(directory.glob("model*.safetensors")):
        return []
    return sorted(directory.glob("pytorch_model*.bin"))


def _untrusted_pretrained(key: str, path: str | os.PathLike, file: str | os.PathLike, needs: list[str]) -> str:
    return (
        f"{key}={path}: {file} needs {needs or 'more than tensors'} to load, which can run arbitrary code; billa "
        "loads only tensors and plain Python types from a model's weights. Nothing was loaded. If you trust whoever "
        "wrote it, re-save it as safetensors where you trust it "
        "(AutoModelForCausalLM.from_pretrained(dir, weights_only=False).save_pretrained(dir)) and point "
        f"{key} at that directory"
    )


def check_pretrained(path: str | os.PathLike | None, key: str) -> None:
    """Refuse a local HF model directory whose ``.bin`` weights need more than tensors and plain types to unpickle.

    transformers loads ``.bin`` weights with ``weights_only=True``; a crafted file then fails inside torch with advice
    to load it with ``weights_only=False`` (which would run its code). This names the file and what it needs instead.

    Args:
        path: the model directory (``init_from``, ``model.pretrained_path``, ``model_path``); None: nothing to check.
        key: the config key that named it.

    Raises:
        UntrustedCheckpointError: naming the key, the file and the globals it would import or call.
    """
    for file in pretrained_weight_files(path) if path is not None else []:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except Exception:  # an old (non-zip) torch file: torch's weights-only load checks it (pretrained_loading)
            continue
        if unsafe:
            raise UntrustedCheckpointError(_untrusted_pretrained(key, path, file, list(unsafe)))


@contextlib.contextmanager
def pretrained_loading(path: str | os.PathLike | None, key: str) -> Iterator[None]:
    """Around ``from_pretrained(path)``: ``check_pretrained`` first, and torch's weights-only failure (which suggests
    ``weights_only=False``) turned into ``UntrustedCheckpointError`` naming the key.

    Raises:
        UntrustedCheckpointError: the weights need more than tensors and plain Python types.
    """
    check_pretrained(path, key)
    try:
        yield
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise
        needs = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
        files = pretrained_weight_files(path) if path is not None else []
        raise UntrustedCheckpointError(
            _untrusted_pretrained(key, path, files[0] if len(files) == 1 else "its weights", needs)
        ) from err


@contextlib.contextmanager
def weights_only_loading(trust: bool = False) -> Iterator[None]:
    """Every ``torch.load`` inside runs ``weights_only=True`` with ``ZERO_SAFE_GLOBALS`` allowed (DeepSpeed's too)."""
    if trust:
        yield
        return
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"  # read by torch.load at call time: overrides weights_only=False at the call site
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
