"""HF tokenizer directories that keep their SentencePiece ``tokenizer.model``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_dir(path: str | os.PathLike) -> str:
    """Check that ``path`` is a tokenizer directory holding ``tokenizer.model`` and return it as a string."""
    path = Path(path)
    if not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"{path}: expected a Hugging Face tokenizer directory with tokenizer.model (the SentencePiece model); "
            "set model.pretrained_path (or model.tokenizer.path) to a LLaMA directory with the expanded vocabulary"
        )
    return str(path)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory with ``AutoTokenizer`` (what users and evaluation load too)."""
    return AutoTokenizer.from_pretrained(tokenizer_dir(path))


def save_tokenizer_dir(sp_model: bytes | str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Write a LLaMA-style HF tokenizer directory from a SentencePiece model (bytes or path).

    transformers 5 builds the fast tokenizer from ``tokenizer.model`` but ``save_pretrained`` does not write the
    SentencePiece file back (DESIGN.md §8), so it is copied in explicitly. BOS is added by default, as LLaMA's does.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "tokenizer.model"
        if isinstance(sp_model, bytes):
            model_path.write_bytes(sp_model)
        else:
            shutil.copyfile(sp_model, model_path)
        tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
        tokenizer.save_pretrained(out)
        shutil.copyfile(model_path, out / "tokenizer.model")
    return str(out)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer files of directory ``src`` into ``dst`` (model export)."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
