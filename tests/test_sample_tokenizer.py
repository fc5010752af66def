"""The tiny default's tokenizer: a HF directory whose ids equal SentencePiece's on the sample corpus."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer

from billa.data.sample import sample_texts


def test_hf_ids_equal_sentencepiece_ids_on_sample_text(sample_tokenizer_dir, sample_corpus):
    hf = AutoTokenizer.from_pretrained(sample_tokenizer_dir)
    sp = spm.SentencePieceProcessor(model_file=str(Path(sample_tokenizer_dir) / "tokenizer.model"))
    zh, en = sample_texts(sample_corpus, "val")
    texts = zh + en + ["混合 mixed 文本 with 123 digits、标点！\nand a newline"]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert sp.decode(sp.encode(text)) == text
    assert hf.encode("你好")[0] == hf.bos_token_id == sp.bos_id() == 1
    assert (hf.eos_token_id, hf.unk_token_id) == (2, 0)
    assert len(hf) == sp.get_piece_size() == 3000


def test_byte_fallback_covers_unseen_characters(sample_tokenizer_dir):
    sp = spm.SentencePieceProcessor(model_file=str(Path(sample_tokenizer_dir) / "tokenizer.model"))
    text = "🙂 龘"
    ids = sp.encode(text)
    assert sp.unk_id() not in ids and sp.decode(ids) == text
