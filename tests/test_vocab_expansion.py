"""Vocabulary expansion on the sample corpus: the English-only base (LLaMA's stand-in) + Chinese pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from billa.sample.corpus import sample_texts
from billa.sample.tokenizer import sample_base_tokenizer
from billa.tokenizer.expand import load_base_model_proto, merge_pieces, resize_model, tokenization_stats

from .helpers import run_door, tiny_llama

MIXED = [
    "老师，您好！ Hello, nice to meet you.",
    "  two leading spaces,  inner  runs   of spaces\nand\n\nnewlines\ttabs",
    " leading space 中文 with digits 2026-11-25 and 3.14159",
    "标点符号：“引号”、《书名》……——！？ emoji 😀🙂🇨🇳 and 龘 (rare)",
    "def f(x):\n    return x ** 2  # code\n",
]


@pytest.fixture(scope="module")
def base_dir(cache_dir, sample_tokenizer_dir) -> str:
    return sample_base_tokenizer(cache_dir / "sample")


@pytest.fixture(scope="module")
def sp_base(base_dir):
    return spm.SentencePieceProcessor(model_file=str(Path(base_dir) / "tokenizer.model"))


@pytest.fixture(scope="module")
def sp_merged(sample_tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(Path(sample_tokenizer_dir) / "tokenizer.model"))


def test_every_base_piece_keeps_its_id_score_and_type(base_dir, sample_tokenizer_dir):
    base, merged = load_base_model_proto(base_dir), load_base_model_proto(sample_tokenizer_dir)
    assert len(merged.pieces) > len(base.pieces) + 1000
    for i, piece in enumerate(base.pieces):
        other = merged.pieces[i]
        assert (other.piece, other.score, other.type) == (piece.piece, piece.score, piece.type), i
    assert merged.normalizer_spec == base.normalizer_spec
    assert merged.trainer_spec.byte_fallback and merged.trainer_spec.vocab_size == len(merged.pieces)
    new_scores = [p.score for p in merged.pieces[len(base.pieces) :]]
    assert max(new_scores) < min(p.score for p in base.pieces if p.type == 1)  # below every base merge


def test_special_ids_unchanged(sp_base, sp_merged, sample_tokenizer_dir):
    assert (
        (sp_merged.unk_id(), sp_merged.bos_id(), sp_merged.eos_id())
        == (sp_base.unk_id(), sp_base.bos_id(), sp_base.eos_id())
        == (0, 1, 2)
    )
    hf = AutoTokenizer.from_pretrained(sample_tokenizer_dir)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf("你好")["input_ids"][0] == 1  # BOS added, as LLaMA's tokenizer does


def test_english_tokenises_to_identical_ids(sp_base, sp_merged, sample_corpus):
    _, en = sample_texts(sample_corpus, "val")
    english = en + [MIXED[4], "The quick brown fox jumps over the lazy dog. 1234567890 !@#$%^&*()"]
    for text in english:
        assert sp_merged.encode(text) == sp_base.encode(text), text


@pytest.mark.parametrize("text", MIXED)
def test_round_trip_and_hf_equals_sentencepiece(sp_merged, sample_tokenizer_dir, text):
    hf = AutoTokenizer.from_pretrained(sample_tokenizer_dir)
    ids = sp_merged.encode(text)
    assert sp_merged.decode(ids) == text
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(hf.encode(text), skip_special_tokens=True) == text


def test_hf_equals_sentencepiece_on_the_sample_corpus(sp_merged, sample_tokenizer_dir, sample_corpus):
    hf = AutoTokenizer.from_pretrained(sample_tokenizer_dir)
    zh, en = sample_texts(sample_corpus, "val")
    for text in zh + en:
        assert hf.encode(text, add_special_tokens=False) == sp_merged.encode(text)


def test_chinese_tokens_per_character_fall_by_40_percent(sp_base, sp_merged, sample_corpus, sample_tokenizer_dir):
    zh, _ = sample_texts(sample_corpus, "val")
    before, after = tokenization_stats(sp_base, zh), tokenization_stats(sp_merged, zh)
    assert after["tokens_per_char"] <= 0.6 * before["tokens_per_char"], (before, after)
    assert before["cjk_byte_fallback_share"] == 1.0  # an English-only base spells every hanzi in bytes
    assert after["cjk_byte_fallback_share"] < 0.05
    report = json.loads((Path(sample_tokenizer_dir) / "expansion_report.json").read_text())
    assert report["zh"]["after"]["tokens_per_char"] == pytest.approx(after["tokens_per_char"])
    assert report["en"]["before"]["tokens"] == report["en"]["after"]["tokens"]
    assert report["pieces_added"] == report["merged_pieces"] - report["base_pieces"]


def test_ascii_pieces_are_only_added_on_request(base_dir):
    base = load_base_model_proto(base_dir)
    addition = load_base_model_proto(base_dir)  # reuse the proto type; replace its pieces
    del addition.pieces[:]
    for text in ("▁zzqx", "中国", "▁中"):
        piece = addition.pieces.add()
        piece.piece, piece.score, piece.type = text, 0.0, 1
    assert [p.piece for p in merge_pieces(base, addition).pieces[len(base.pieces) :]] == ["中国", "▁中"]
    assert len(merge_pieces(base, addition, keep_ascii=True).pieces) == len(base.pieces) + 3


@pytest.fixture(scope="module")
def tiny_base_model(tmp_path_factory, base_dir):
    model = tiny_llama(
        1000,
        seed=0,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    path = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(path)
    return path


def _byte_ids(text: str) -> list[int]:
    """Known answer: the base's byte pieces <0x00>..<0xFF> are ids 3..258 (after unk, bos, eos)."""
    return [3 + b for b in text.encode("utf-8")]


def test_subword_mean_rows_and_bit_identical_old_rows(
    tiny_base_model, base_dir, sample_tokenizer_dir, sp_base, tmp_path
):
    out = tmp_path / "resized"
    resize_model(tiny_base_model, base_dir, sample_tokenizer_dir, out, init="subword_mean")
    old, new = load_file(tiny_base_model / "model.safetensors"), load_file(out / "model.safetensors")
    merged = load_base_model_proto(sample_tokenizer_dir)
    assert new["model.embed_tokens.weight"].shape == (len(merged.pieces), 16)
    checked = 0
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(new[key][:1000], old[key])  # bit-identical base rows
        for piece_id in (1000, 1001, 1500, len(merged.pieces) - 1):
            piece = merged.pieces[piece_id].piece
            text = piece.replace("▁", "")
            ids = ([sp_base.piece_to_id("▁")] if piece.startswith("▁") else []) + _byte_ids(text)
            if not all(ord(ch) > 127 for ch in text):
                continue  # the hand computation below covers pieces made only of non-ASCII characters
            expected = old[key][ids].mean(dim=0)
            torch.testing.assert_close(new[key][piece_id], expected, rtol=0, atol=1e-7, msg=f"{key} {piece}")
            checked += 1
    assert checked >= 6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(out))


def test_mean_random_and_padding(tiny_base_model, base_dir, sample_tokenizer_dir, tmp_path):
    resize_model(tiny_base_model, base_dir, sample_tokenizer_dir, tmp_path / "mean", init="mean", pad_to_multiple_of=64)
    old = load_file(tiny_base_model / "model.safetensors")["model.embed_tokens.weight"]
    mean = load_file(tmp_path / "mean" / "model.safetensors")["model.embed_tokens.weight"]
    assert mean.shape[0] % 64 == 0 and mean.shape[0] >= len(load_base_model_proto(sample_tokenizer_dir).pieces)
    torch.testing.assert_close(mean[1000:], old.mean(dim=0).expand(mean.shape[0] - 1000, -1))
    resize_model(tiny_base_model, base_dir, sample_tokenizer_dir, tmp_path / "random", init="random")
    random_rows = load_file(tmp_path / "random" / "model.safetensors")["model.embed_tokens.weight"][1000:]
    assert random_rows.std().item() == pytest.approx(old.std().item(), rel=0.1)
    assert random_rows.mean().abs().item() < 0.01


def test_convert_expand_vocab_end_to_end(tiny_base_model, base_dir, sample_corpus, tmp_path):
    out = tmp_path / "expanded"
    result = run_door(
        "convert.py",
        "op=expand_vocab",
        f"op.base_tokenizer={base_dir}",
        f"op.base_model={tiny_base_model}",
        f"op.out_dir={out}",
        "op.vocab_size=2200",
        f"op.chinese_text=[{{path: '{sample_corpus}/wudao/train/*.json', format: wudao}},"
        f"{{path: '{sample_corpus}/translation/train/*.jsonl', format: translation}}]",
        f"op.report_text={{zh: [{{path: '{sample_corpus}/wudao/val.json', format: wudao}}]}}",
        f"op.english_text=[{{path: '{sample_corpus}/pile/val.jsonl', format: pile}}]",
        "op.pad_to_multiple_of=64",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "expansion_report.json").read_text())
    assert report["pieces_added"] > 300 and report["model"]["rows"] % 64 == 0
    assert report["zh"]["after"]["tokens_per_char"] < report["zh"]["before"]["tokens_per_char"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == report["model"]["rows"] >= len(tokenizer)
    assert "Traceback" not in result.stderr


def test_too_small_vocabulary_is_a_clear_error(base_dir, sample_corpus, tmp_path):
    result = run_door(
        "convert.py",
        "op=expand_vocab",
        f"op.base_tokenizer={base_dir}",
        f"op.out_dir={tmp_path}",
        "op.vocab_size=500",
        f"op.chinese_text=[{{path: '{sample_corpus}/wudao/train/*.json', format: wudao}}]",
        f"op.english_text=[{{path: '{sample_corpus}/pile/val.jsonl', format: pile}}]",
    )
    assert result.returncode != 0
    assert "op.vocab_size=500" in result.stderr and "Vocabulary size is smaller than required_chars" in result.stderr
    assert "Traceback" not in result.stderr
