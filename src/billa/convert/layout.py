"""Checkpoint layouts: find, read and rewrite one tensor in a HF directory of any sharding, read LLaMA's embedding.

A HF model directory holds its weights as ``model.safetensors`` or ``pytorch_model.bin``, or as shards listed by
``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` (``weight_map``: tensor name -> shard file).
Meta's LLaMA release holds ``consolidated.NN.pth`` files whose ``tok_embeddings.weight`` is split along the
embedding dimension across model-parallel shards (one file for 7B).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from billa.utils.errors import BillaError

HF_EMBED = "model.embed_tokens.weight"
META_EMBED = "tok_embeddings.weight"
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class LayoutError(BillaError, ValueError):
    """A checkpoint directory or file does not hold what was expected (the message names the path)."""


def tensor_file(model_dir: str | os.PathLike, name: str, key: str = "op.model") -> Path:
    """The file of ``model_dir`` that holds tensor ``name``, through the shard index when there is one.

    Args:
        model_dir: a HF model directory.
        name: the tensor's key, e.g. ``model.embed_tokens.weight``.
        key: the config key that named ``model_dir`` (for error messages).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LayoutError(f"{key}={model_dir}: not a directory")
    for index in INDEXES:
        if (model_dir / index).is_file():
            weight_map = json.loads((model_dir / index).read_text()).get("weight_map", {})
            if name not in weight_map:
                raise LayoutError(f"{key}={model_dir}: {index} lists no tensor {name!r}")
            path = model_dir / weight_map[name]
            if not path.is_file():
                raise LayoutError(f"{key}={model_dir}: {index} maps {name!r} to {weight_map[name]}, which is missing")
            return path
    for single in SINGLE_FILES:
        if (model_dir / single).is_file():
            return model_dir / single
    raise LayoutError(f"{key}={model_dir}: no HF weights found (expected one of {', '.join(INDEXES + SINGLE_FILES)})")


def load_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """All tensors of one weight file and its safetensors metadata (None for ``.bin``)."""
    with _named(path):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
            return load_file(str(path)), metadata
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), None


def save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """Write one weight file in the format its name says, with the metadata it had."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a weight file (safetensors reads only that tensor)."""
    with _named(path):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(name) if name in f.keys() else None
        else:
            tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(name)
    if tensor is None:
        raise LayoutError(f"{path}: no tensor {name!r}")
    return tensor


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """Every weight file of a HF directory: the shards its index lists, or its single file."""
    model_dir = Path(model_dir)
    for index in INDEXES:
        if (model_dir / index).is_file():
            weight_map = json.loads((model_dir / index).read_text()).get("weight_map", {})
            return [model_dir / name for name in sorted(set(weight_map.values()))]
    return [model_dir / single for single in SINGLE_FILES if (model_dir / single).is_file()]


def check_readable(path: Path) -> None:
    """Raise ``LayoutError`` naming ``path`` when it is missing or not a complete weight file.

    A safetensors header records where every tensor ends, so opening it catches a truncated file without reading
    the tensors; a ``.bin`` is a zip archive whose directory sits at its end (memory-mapped, not read).
    """
    if not path.is_file():
        raise LayoutError(f"{path}: missing (its index lists it): copy or download it again")
    with _named(path):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):
                pass
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)


@contextlib.contextmanager
def _named(path: Path) -> Iterator[None]:
    """Turn a reader's bare error on a truncated or damaged file into a ``LayoutError`` that names the file."""
    try:
        yield
    except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        size = path.stat().st_size if path.is_file() else 0
        raise LayoutError(
            f"{path}: not a readable weight file ({size} bytes; {type(err).__name__}: {err}): truncated or damaged, "
            "e.g. an interrupted download or copy; copy or download it again"
        ) from err


def load_llama_embedding(llama: str | os.PathLike, key: str = "op.llama") -> tuple[torch.Tensor, str]:
    """The original LLaMA input embedding ``(vocab, hidden)`` and a description of where it came from.

    Args:
        llama: Meta's ``consolidated.00.pth``, a directory of ``consolidated.NN.pth`` files, or a HF LLaMA directory.
        key: the config key that named ``llama`` (for error messages).
    """
    path = Path(llama)
    if path.is_file():
        shards = [path]
    elif path.is_dir():
        shards = sorted(path.glob("consolidated.*.pth"))
    else:
        raise LayoutError(f"{key}={llama}: no such file or directory")
    if not shards:  # a HF directory
        return read_tensor(tensor_file(path, HF_EMBED, key), HF_EMBED), f"{path} ({HF_EMBED})"
    parts = []
    for shard in shards:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # a pickle that is not plain tensors, or not a torch file at all
            raise LayoutError(f"{key}={llama}: {shard} is not a loadable weights-only torch file ({err})") from err
        if META_EMBED not in state:
            raise LayoutError(f"{key}={llama}: {shard} holds no {META_EMBED!r} (is it Meta's LLaMA checkpoint?)")
        parts.append(state[META_EMBED])
    # Meta's ParallelEmbedding splits the embedding dimension across model-parallel ranks: (V, H / n) each.
    embedding = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return embedding, f"{path} ({META_EMBED}, {len(shards)} file{'s' if len(shards) > 1 else ''})"
