"""Export a trained model as a standard Hugging Face directory (sharded safetensors + config + tokenizer).

Under ZeRO-3 every rank holds a slice of each parameter; ``gather_state_dict`` collects them one parameter at a
time onto rank 0 (CPU), so no rank ever holds two copies and nobody runs ``zero_to_fp32.py`` by hand.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel

from billa.model_card import ModelCard, render_model_card
from billa.tokenizer.chat import write_serving_config
from billa.tokenizer.load import copy_tokenizer_files
from billa.utils.logging import get_logger

log = get_logger(__name__)

# BiLLa's sampling for its answers (temperature 0.7, up to 1,024 new tokens); `export.generation` overrides
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.7, "max_new_tokens": 1024}


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
    *,
    model_max_length: int | None = None,
    generation: Mapping | None = None,
    card: ModelCard | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> str:
    """Write ``model`` (or ``state_dict`` with ``model``'s config) + the tokenizer to ``out_dir`` atomically.

    The directory is ready to serve: ``tokenizer_config.json`` carries BiLLa's chat template, the trained context
    length and a padding token; ``generation_config.json`` the special ids and sampling defaults; ``README.md`` the
    model card with Hub metadata. It is assembled under ``<out_dir>.tmp`` and renamed at the end, so a crash never
    leaves a directory that looks complete. ``AutoModelForCausalLM`` and ``AutoTokenizer`` load the result.

    Args:
        model: the model (its config is written; its weights unless ``state_dict`` is given).
        tokenizer_dir: the tokenizer directory trained with.
        out_dir: the directory to write.
        state_dict: full weights gathered from ZeRO-3 (``gather_state_dict``).
        max_shard_size: safetensors shard size.
        model_max_length: the context length trained on (``data.max_seq_length``); None leaves the tokenizer's.
        generation: ``GenerationConfig`` fields; None: BiLLa's sampling (``SAMPLING_DEFAULTS``).
        card: what the model card states; None writes no ``README.md``.
        extra_files: file name -> text, written into the directory too (``billa_data_state.json``: where the stage
            stopped reading its stream sources, which the next stage continues from).
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_tokenizer_files(tokenizer_dir, tmp)
    write_serving_config(tmp, model_max_length)
    pad_id = AutoTokenizer.from_pretrained(tmp).pad_token_id  # also checks that the written config loads
    model.config.pad_token_id = pad_id
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=pad_id,
        **dict(SAMPLING_DEFAULTS if generation is None else generation),
    )
    model.config.use_cache = True
    if state_dict is not None:
        state_dict = {k: v for k, v in state_dict.items() if k in model.state_dict()}  # persistent entries only
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size)
    if card is not None:
        (tmp / "README.md").write_text(render_model_card(card), encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    log.info("Exported the Hugging Face model to %s", out)
    return str(out)
