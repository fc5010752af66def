"""Helpers for the evaluation tests: a tiny exported model (no training) and an EvalLM on it."""

from __future__ import annotations

from pathlib import Path

import torch

from .helpers import tiny_llama

TINY_EVAL_ARCH = dict(  # smaller than model=tiny: the evaluation tests only need a real LLaMA forward pass
    hidden_size=64,
    intermediate_size=128,
    max_position_embeddings=512,
)


def make_export(tokenizer_dir: str, out_dir: Path, seed: int = 0) -> Path:
    """A random-init LlamaForCausalLM with the sample tokenizer, saved as train.py exports it."""
    from transformers import AutoTokenizer

    from billa.export import save_hf_model

    torch.manual_seed(seed)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    model = tiny_llama(vocab, **TINY_EVAL_ARCH)
    with torch.no_grad():  # larger weights than the 0.02 init: scores and generations differ between options
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    save_hf_model(model, tokenizer_dir, out_dir)
    return out_dir
