"""Export a trained model as a standard Hugging Face directory (sharded safetensors + config + tokenizer).

Under ZeRO-3 every rank holds a slice of each parameter; ``gather_state_dict`` collects them one parameter at a
time onto rank 0 (CPU), so no rank ever holds two copies and nobody runs ``zero_to_fp32.py`` by hand.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel

from billa.tokenizer.load import copy_tokenizer_files
from billa.utils.logging import get_logger

log = get_logger(__name__)


def gather_state_dict(model: torch.nn.Module, is_rank_zero: bool) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU state dict on rank 0 (None elsewhere). Collective under ZeRO-3: call on every rank."""
    state = {}
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):  # a ZeRO-3 partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_rank_zero:
                    state[name] = param.detach().to("cpu", torch.float32, copy=True)
        elif is_rank_zero:
            state[name] = param.detach().to("cpu", torch.float32, copy=True)
    if is_rank_zero:
        for name, buffer in model.named_buffers():
            state.setdefault(name, buffer.detach().cpu())
    return state if is_rank_zero else None


def save_hf_model(
    model: PreTrainedModel,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: str = "2GB",
) -> str:
    """Write ``model`` (or ``state_dict`` with ``model``'s config) + the tokenizer to ``out_dir`` atomically.

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
    model.config.use_cache = True
    if state_dict is not None:
        state_dict = {k: v for k, v in state_dict.items() if k in model.state_dict()}  # persistent entries only
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size)
    copy_tokenizer_files(tokenizer_dir, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    log.info("Exported the Hugging Face model to %s", out)
    return str(out)
