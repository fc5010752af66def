"""Export a trained model as a standard Hugging Face directory (sharded safetensors + config + tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import GenerationConfig, PreTrainedModel

from billa.tokenizer.load import copy_tokenizer_files
from billa.utils.logging import get_logger

log = get_logger(__name__)


def save_hf_model(
    model: PreTrainedModel, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, max_shard_size: str = "2GB"
) -> str:
    """Write ``model`` + the tokenizer of ``tokenizer_dir`` to ``out_dir`` atomically.

    The directory is assembled under ``<out_dir>.tmp`` and renamed at the end, so a crash never leaves a directory
    that looks complete. ``AutoModelForCausalLM`` and ``AutoTokenizer`` load the result.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id, max_new_tokens=256
    )
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    copy_tokenizer_files(tokenizer_dir, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    log.info("Exported the Hugging Face model to %s", out)
    return str(out)
