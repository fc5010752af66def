"""The tiny default's tokenizer, trained offline on the sample corpus and cached."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from billa.data.sample import sample_texts
from billa.tokenizer.load import save_tokenizer_dir
from billa.tokenizer.sentencepiece_train import train_sentencepiece
from billa.utils.logging import get_logger

log = get_logger(__name__)


def sample_tokenizer(cache_dir: str | os.PathLike, vocab_size: int = 3000) -> str:
    """Return a HF tokenizer directory for the sample corpus, training it on first use.

    A bilingual SentencePiece BPE model with byte fallback, trained on the train split of the sample corpus.
    """
    out = Path(cache_dir) / f"tokenizer-bpe{vocab_size}"
    if (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file():
        return str(out)
    zh, en = sample_texts(Path(cache_dir) / "corpus")
    model = train_sentencepiece(zh + en, vocab_size=vocab_size)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_tokenizer_dir(model, tmp)
    try:
        tmp.replace(out)  # atomic: a concurrent rank either sees no directory or a complete one
    except OSError:  # another process finished first; its result is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Trained the sample tokenizer (%d pieces) into %s", vocab_size, out)
    return str(out)
