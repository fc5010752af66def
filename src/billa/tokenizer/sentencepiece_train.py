"""Train SentencePiece models in memory (the sample tokenizer; later the Chinese vocabulary of the expansion)."""

from __future__ import annotations

import io
from collections.abc import Iterable

import sentencepiece as spm


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    input_sentence_size: int = 0,
    verbose: bool = False,
) -> bytes:
    """Train a LLaMA-style SentencePiece model (BOS=1, EOS=2, UNK=0, no pad, digits split, identity normaliser).

    Returns:
        The serialized model proto.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        minloglevel=0 if verbose else 2,  # SentencePiece's own progress log on stderr
    )
    return model.getvalue()
