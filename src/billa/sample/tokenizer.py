"""The tiny default's tokenizer, built offline from the sample corpus with the real expansion step.

A stand-in for LLaMA's: an English-only SentencePiece BPE model with byte fallback (the "base"), expanded with a
Chinese model trained on the sample corpus's Chinese side, exactly as ``convert.py op=expand_vocab`` expands LLaMA.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from billa.sample.corpus import sample_texts
from billa.tokenizer.expand import expand_tokenizer
from billa.tokenizer.load import save_tokenizer_dir
from billa.tokenizer.sentencepiece_train import train_sentencepiece
from billa.utils.logging import get_logger

log = get_logger(__name__)


def _atomic_dir(out: Path, build) -> None:
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        tmp.replace(out)  # atomic: a concurrent rank sees no directory or a complete one
    except OSError:  # another process finished first; its result is identical
        shutil.rmtree(tmp, ignore_errors=True)


def sample_base_tokenizer(cache_dir: str | os.PathLike, vocab_size: int = 1000) -> str:
    """The English-only base tokenizer (byte fallback covers everything else), trained on the sample's English."""
    out = Path(cache_dir) / f"tokenizer-base-en{vocab_size}"
    if not (out / "tokenizer_config.json").is_file():
        _, en = sample_texts(Path(cache_dir) / "corpus")
        _atomic_dir(out, lambda tmp: save_tokenizer_dir(train_sentencepiece(en, vocab_size), tmp))
    return str(out)


def sample_tokenizer(cache_dir: str | os.PathLike, base_vocab_size: int = 1000, chinese_vocab_size: int = 2500) -> str:
    """The expanded tokenizer of the tiny default, built on first use and cached; returns its HF directory."""
    out = Path(cache_dir) / f"tokenizer-en{base_vocab_size}-zh{chinese_vocab_size}"
    if (out / "tokenizer_config.json").is_file():
        return str(out)
    base = sample_base_tokenizer(cache_dir, base_vocab_size)
    zh, _ = sample_texts(Path(cache_dir) / "corpus")
    zh_val, en_val = sample_texts(Path(cache_dir) / "corpus", "val")
    lines = [line for text in zh for line in text.splitlines() if line.strip()]
    _atomic_dir(
        out,
        lambda tmp: expand_tokenizer(
            base, lines, tmp, vocab_size=chinese_vocab_size, report_texts={"zh": zh_val, "en": en_val}
        ),
    )
    return str(out)
