"""Vocabulary expansion: a Chinese SentencePiece model merged into a LLaMA-style base, and the model resized.

BiLLa grew LLaMA's 32,000 pieces to 46,943 without publishing how (docs/recipe.md, "Vocabulary"). billa's procedure:

1. train a Chinese SentencePiece BPE model on Chinese text (no byte fallback: bytes stay the base's);
2. append every NORMAL piece the base lacks (or exactly the first ``added_pieces`` of them), in the Chinese model's
   order, with distinct float32 scores below every base score, so that no base merge changes priority; by default
   only pieces with a non-ASCII character are added, so ASCII (English, code) text tokenises to exactly the ids it
   had before;
3. keep every base piece's id, score and type, the base normaliser, byte fallback and special tokens;
4. resize input embeddings and lm_head, initialising new rows from the base rows (``subword_mean``: mean of the rows
   of the base pieces the new piece splits into; ``mean``; ``random``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from billa.progress import track
from billa.tokenizer.load import save_tokenizer_dir
from billa.tokenizer.sentencepiece_train import train_sentencepiece
from billa.utils.errors import ConfigError
from billa.utils.logging import get_logger

log = get_logger(__name__)

NORMAL = sp_pb2.ModelProto.SentencePiece.NORMAL
BYTE = sp_pb2.ModelProto.SentencePiece.BYTE
INIT_STRATEGIES = ("subword_mean", "mean", "random")


def is_cjk(ch: str) -> bool:
    """CJK unified ideographs (incl. extension A and compatibility ideographs)."""
    code = ord(ch)
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF


def load_base_model_proto(path: str | os.PathLike) -> sp_pb2.ModelProto:
    """A base SentencePiece model from a ``.model`` file or a HF directory holding ``tokenizer.model``."""
    path = Path(path)
    model_file = path / "tokenizer.model" if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(f"{path}: expected a SentencePiece .model file or a directory with tokenizer.model")
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def merge_pieces(
    base: sp_pb2.ModelProto, addition: sp_pb2.ModelProto, keep_ascii: bool = False, limit: int | None = None
) -> sp_pb2.ModelProto:
    """``base`` + every NORMAL piece of ``addition`` it lacks (the first ``limit`` of them), below all of base's scores.

    The new pieces keep ``addition``'s merge order with distinct float32 scores (SentencePiece stores scores as
    float32): each is the next representable float32 below the previous one, starting below the lowest base score,
    sentinels included (LLaMA's "▁▁" sits at -1e9, where float32 values are 64 apart: subtracting 1.0 there would give
    whole groups of new pieces one score and lose their order).

    Raises:
        ValueError: ``limit`` is larger than the number of pieces ``addition`` can contribute.
    """
    merged = sp_pb2.ModelProto()
    merged.CopyFrom(base)
    existing = {p.piece for p in base.pieces}
    score = np.float32(min((p.score for p in base.pieces if p.type == NORMAL), default=0.0))
    added = 0
    for piece in addition.pieces:
        if limit is not None and added >= limit:
            break
        if piece.type != NORMAL or piece.piece in existing:
            continue
        if not keep_ascii and piece.piece.replace("▁", " ").isascii():
            continue
        score = np.nextafter(score, np.float32(-np.inf), dtype=np.float32)
        new = merged.pieces.add()
        new.piece, new.score, new.type = piece.piece, float(score), NORMAL
        existing.add(piece.piece)
        added += 1
    if limit is not None and added < limit:
        raise ValueError(
            f"op.added_pieces={limit}: the Chinese model offers only {added} new pieces (of its "
            f"{len(addition.pieces)}); raise op.vocab_size"
        )
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged


def tokenization_stats(processor: spm.SentencePieceProcessor, texts: Iterable[str]) -> dict:
    """Tokens per character, and the share of CJK characters that fall back to bytes."""
    chars = tokens = cjk = cjk_bytes = 0
    fallback_cache: dict[str, bool] = {}
    for text in texts:
        chars += len(text)
        tokens += len(processor.encode(text))
        for ch in text:
            if is_cjk(ch):
                cjk += 1
                if ch not in fallback_cache:
                    fallback_cache[ch] = any(processor.is_byte(i) for i in processor.encode(ch))
                cjk_bytes += fallback_cache[ch]
    return {
        "characters": chars,
        "tokens": tokens,
        "tokens_per_char": tokens / max(chars, 1),
        "cjk_chars": cjk,
        "cjk_byte_fallback_share": cjk_bytes / max(cjk, 1),
    }


def expand_tokenizer(
    base_tokenizer: str | os.PathLike,
    chinese_texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 20000,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    keep_ascii_pieces: bool = False,
    report_texts: dict[str, list[str]] | None = None,
    added_pieces: int | None = None,
) -> dict:
    """Train the Chinese model, merge it into the base, write a HF tokenizer directory and a report.

    Returns:
        The report (also saved as ``<out_dir>/expansion_report.json``): base and merged sizes, pieces added, and
        ``tokenization_stats`` before/after for each of ``report_texts`` (e.g. ``{"zh": [...], "en": [...]}``).
    """
    base = load_base_model_proto(base_tokenizer)
    texts = list(track(chinese_texts, desc="reading Chinese text", unit="lines"))
    if not texts:
        raise ValueError("no Chinese text to train on: check op.chinese_text")
    log.info("Training a Chinese SentencePiece BPE model (%d pieces) on %d lines", vocab_size, len(texts))
    chinese = sp_pb2.ModelProto()
    try:
        model = train_sentencepiece(
            texts,
            vocab_size,
            character_coverage=character_coverage,
            byte_fallback=False,
            input_sentence_size=input_sentence_size,
            verbose=True,
        )
    except RuntimeError as err:  # SentencePiece's C++ checks, e.g. fewer pieces than distinct characters
        raise ValueError(
            f"op.vocab_size={vocab_size}, op.character_coverage={character_coverage}: SentencePiece "
            f"refused to train: {str(err).split('] ')[-1]}"
        ) from None
    chinese.ParseFromString(model)
    try:
        merged = merge_pieces(base, chinese, keep_ascii=keep_ascii_pieces, limit=added_pieces)
    except ValueError as err:
        raise ConfigError(f"{err} (op.vocab_size={vocab_size})") from None
    out = Path(out_dir)
    save_tokenizer_dir(merged.SerializeToString(), out)

    before = spm.SentencePieceProcessor(model_proto=base.SerializeToString())
    after = spm.SentencePieceProcessor(model_proto=merged.SerializeToString())
    report = {
        "base_pieces": len(base.pieces),
        "chinese_model_pieces": len(chinese.pieces),
        "merged_pieces": len(merged.pieces),
        "pieces_added": len(merged.pieces) - len(base.pieces),
    }
    for name, sample in (report_texts or {}).items():
        report[name] = {"before": tokenization_stats(before, sample), "after": tokenization_stats(after, sample)}
    (out / "expansion_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    log.info("Vocabulary expansion: %s", json.dumps(report, ensure_ascii=False))
    return report


def _decomposition_processor(base: sp_pb2.ModelProto) -> spm.SentencePieceProcessor:
    """The base tokenizer without its dummy prefix, to split a new piece exactly into base pieces."""
    proto = sp_pb2.ModelProto()
    proto.CopyFrom(base)
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def subword_ids(base: sp_pb2.ModelProto, pieces: Sequence[str]) -> list[list[int]]:
    """Base ids each new piece splits into (``"▁中国"`` is the text ``" 中国"``)."""
    processor = _decomposition_processor(base)
    return [processor.encode(piece.replace("▁", " ")) for piece in pieces]


@torch.no_grad()
def init_new_rows(
    weight: torch.Tensor,
    base_rows: int,
    strategy: str,
    decompositions: Sequence[Sequence[int]] | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Fill ``weight[base_rows:]`` in place from ``weight[:base_rows]`` with ``strategy`` (see the module docstring).

    Rows past ``len(decompositions)`` (padding to a multiple) get the mean of the base rows.
    """
    if strategy not in INIT_STRATEGIES:
        raise ValueError(f"op.init={strategy!r}: expected one of {INIT_STRATEGIES}")
    old = weight[:base_rows].float()  # (V_base, H)
    mean = old.mean(dim=0)
    n_new = weight.shape[0] - base_rows
    if strategy == "random":
        rows = torch.randn((n_new, weight.shape[1]), generator=generator) * old.std()
    else:
        rows = mean.expand(n_new, -1).clone()
        if strategy == "subword_mean":
            for i, ids in enumerate(decompositions or []):
                if ids:
                    rows[i] = old[list(ids)].mean(dim=0)
    weight[base_rows:] = rows.to(weight.dtype)


def resize_model(
    base_model: str | os.PathLike,
    base_tokenizer: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    init: str = "subword_mean",
    pad_to_multiple_of: int | None = None,
    seed: int = 0,
    max_shard_size: str = "5GB",
) -> dict:
    """Resize a base HF model's input embeddings and lm_head to the merged vocabulary; write a HF directory.

    One copy of the weights is held (the base model, loaded in its own dtype); only the two embedding matrices are
    reallocated. Base rows are left bit-identical.
    """
    from transformers import AutoModelForCausalLM

    base = load_base_model_proto(base_tokenizer)
    merged = load_base_model_proto(tokenizer_dir)
    base_size, new_size = len(base.pieces), len(merged.pieces)
    for i, (a, b) in enumerate(zip(base.pieces, merged.pieces, strict=False)):
        if (a.piece, a.score, a.type) != (b.piece, b.score, b.type):
            raise ValueError(f"{tokenizer_dir}: piece {i} differs from the base tokenizer's; not an expansion of it")
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != base_size:
        raise ValueError(f"{base_model} has {rows} embedding rows but {base_tokenizer} has {base_size} pieces")
    new_pieces = [p.piece for p in merged.pieces[base_size:]]
    decompositions = subword_ids(base, new_pieces) if init == "subword_mean" else None
    model.resize_token_embeddings(new_size, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    init_new_rows(model.get_input_embeddings().weight, base_size, init, decompositions, generator)
    if not model.config.tie_word_embeddings:
        init_new_rows(model.get_output_embeddings().weight, base_size, init, decompositions, generator)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")  # a sibling: the weights are written once and renamed into place
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "expansion_report.json"):
        if (Path(tokenizer_dir) / name).exists():
            shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    log.info(
        "Resized %s from %d to %d rows (%s init) into %s",
        base_model,
        base_size,
        model.get_input_embeddings().weight.shape[0],
        init,
        out,
    )
    return {
        "base_rows": base_size,
        "rows": model.get_input_embeddings().weight.shape[0],
        "init": init,
        "out_dir": str(out),
    }


def expand_vocabulary(
    base_tokenizer: str | os.PathLike,
    chinese_texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 20000,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    keep_ascii_pieces: bool = False,
    report_texts: dict[str, list[str]] | None = None,
    added_pieces: int | None = None,
    base_model: str | os.PathLike | None = None,
    init: str = "subword_mean",
    pad_to_multiple_of: int | None = None,
    seed: int = 0,
) -> dict:
    """The expanded tokenizer (and, with ``base_model``, the resized model) in ``out_dir``, from texts.

    Reading corpora is the caller's job (``convert.py op=expand_vocab`` reads its configured files); this takes the
    lines themselves, so the tokenizer package never depends on the data readers.

    Args:
        base_tokenizer: HF directory with ``tokenizer.model`` or a bare SentencePiece ``.model``.
        chinese_texts: lines of Chinese text to train the Chinese model on (read lazily, once).
        out_dir: the tokenizer directory (+ the resized model when ``base_model`` is set).
        report_texts: ``{"zh": [...lines], "en": [...lines]}`` measured before/after.
        base_model: HF model directory whose embeddings and lm_head are resized; None writes only the tokenizer.
        added_pieces: exactly this many new pieces (the first of the Chinese model's order); None: all it offers.

    Returns:
        The expansion report (``expand_tokenizer``), with ``model`` (``resize_model``'s summary) when resized.
    """
    if base_model is None:
        return expand_tokenizer(
            base_tokenizer,
            chinese_texts,
            out_dir,
            vocab_size,
            character_coverage,
            input_sentence_size,
            keep_ascii_pieces,
            report_texts,
            added_pieces,
        )
    with tempfile.TemporaryDirectory() as tok_dir:
        report = expand_tokenizer(
            base_tokenizer,
            chinese_texts,
            tok_dir,
            vocab_size,
            character_coverage,
            input_sentence_size,
            keep_ascii_pieces,
            report_texts,
            added_pieces,
        )
        report["model"] = resize_model(base_model, base_tokenizer, tok_dir, out_dir, init, pad_to_multiple_of, seed)
    (Path(out_dir) / "expansion_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return report
