"""Model builders: a model config names an architecture and, optionally, pretrained weights (one place for both)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from billa.config import ConfigError


def llama_config(architecture: Mapping, vocab_size: int, bos_id: int = 1, eos_id: int = 2) -> LlamaConfig:
    """A ``LlamaConfig`` from ``model.architecture`` with the tokenizer's vocabulary size."""
    return LlamaConfig(**dict(architecture), vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id)


def count_parameters(architecture: Mapping, vocab_size: int) -> int:
    """Parameter count of the architecture, computed on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(architecture, vocab_size))
    return sum(p.numel() for p in model.parameters())


def build_causal_lm(
    architecture: Mapping, vocab_size: int, pretrained_path: str | None = None, key: str = "model.pretrained_path"
) -> PreTrainedModel:
    """Random-init LLaMA from ``architecture``, or load ``pretrained_path`` and check its vocabulary.

    Args:
        architecture: LlamaConfig fields (``model.architecture``).
        vocab_size: the tokenizer's size; the model's embedding must have at least this many rows.
        pretrained_path: HF model directory, or None for random init (seed first).
        key: the config key that named ``pretrained_path``, for error messages.
    """
    if pretrained_path is None:
        return LlamaForCausalLM(llama_config(architecture, vocab_size))
    model = AutoModelForCausalLM.from_pretrained(pretrained_path, dtype=torch.float32)
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitioned weights report their full shape there
    if rows < vocab_size:
        raise ConfigError(
            f"{key}={pretrained_path} has {rows} embedding rows but the tokenizer has {vocab_size} pieces: "
            "expand the model's vocabulary first (vocabulary expansion resizes embeddings and lm_head)"
        )
    return model
