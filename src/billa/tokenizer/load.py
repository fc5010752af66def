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


def _match_sentencepiece(tokenizer_json: Path, model_path: Path) -> None:
    """Make the fast tokenizer produce SentencePiece's ids (sentencepiece is billa's reference tokenizer).

    transformers 5's converter ranks BPE merges by the merged piece's id, not its score (LLaMA's "▁▁" has id 259
    but score -1e9), and its Metaspace pre-tokenizer folds a leading space into the dummy prefix. Re-rank the
    merges by score, and normalise as SentencePiece does (prepend "▁", spaces -> "▁", no pre-tokenizer).
    """
    import json

    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    score = {p.piece: (p.score, -i) for i, p in enumerate(proto.pieces)}
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    pairs.sort(key=lambda pair: score[pair[0] + pair[1]], reverse=True)  # highest score merges first
    data["model"]["merges"] = [list(pair) for pair in pairs]
    if proto.normalizer_spec.add_dummy_prefix:
        data["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        }
        data["pre_tokenizer"] = None
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    # LlamaTokenizer in transformers 5 rebuilds its own normalizer and pre-tokenizer on load and would undo the
    # above; the generic fast class loads tokenizer.json as written (BOS comes from its post-processor).
    config_path = tokenizer_json.with_name("tokenizer_config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"], config["add_eos_token"] = True, False
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")


def save_tokenizer_dir(sp_model: bytes | str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Write a LLaMA-style HF tokenizer directory from a SentencePiece model (bytes or path).

    transformers 5 builds the fast tokenizer from ``tokenizer.model`` but ``save_pretrained`` does not write the
    SentencePiece file back (docs/recipe.md, "Traps"), so it is copied in explicitly. BOS is added by default, as
    LLaMA's does.
    ``tokenizer.json`` is adjusted so that the fast tokenizer's ids equal SentencePiece's (``_match_sentencepiece``).
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
    _match_sentencepiece(out / "tokenizer.json", out / "tokenizer.model")
    return str(out)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer files of directory ``src`` into ``dst`` (model export)."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
