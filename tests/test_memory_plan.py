"""The memory plan's activation arithmetic against the memory a real forward + backward holds on this CPU.

``billa.distributed.memory.activation_bytes`` counts what billa's training step keeps (transformers' LLaMA layers,
billa's residual dropout, lm_head + cross-entropy over label positions in chunks). Here the real ``BillaLM.token_nll``
and its backward run under ``torch.distributed._tools.mem_tracker.MemTracker``, which follows every tensor storage
the ops allocate and frees; gradients are dropped as soon as they are accumulated (as ZeRO's buckets do), so the
measured peak beyond the weights is what the plan calls activations. Shapes differ from those the coefficients were
fitted on (hidden 384 with a 1,024 SwiGLU width, grouped-query attention), so a wrong term shows as a wrong total.
"""

from __future__ import annotations

import pytest
import torch

from billa.distributed.memory import PEAK_TOLERANCE, activation_bytes, measure_activations, weight_mode

from .helpers import tiny_module

SHAPE = {  # not a shape the coefficients were fitted on
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
GQA = {**SHAPE, "num_key_value_heads": 2}


def measured_activations(arch, vocab, tokens, mode, checkpointing, chunk, dropout) -> int:
    """Peak bytes of one ``token_nll`` forward + backward of a fresh module beyond weights and buffers, on this CPU."""
    model = {"architecture": arch, "pretrained_path": None, "residual_dropout": dropout, "kernels": "torch"}
    module = tiny_module(model, vocab, seed=0, gradient_checkpointing=checkpointing, loss_chunk_tokens=chunk)
    ids = torch.randint(0, vocab, (2, tokens // 2), generator=torch.Generator().manual_seed(0))
    return measure_activations(
        module, {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}, mode
    )


CASES = [  # (precision, ZeRO stage, architecture, vocabulary, checkpointing, loss chunk, residual dropout)
    ("bf16-mixed", 3, SHAPE, 6000, False, 256, 0.05),  # the recipe's: ZeRO-3 bf16, chunks, BiLLa's dropout
    ("bf16-mixed", 3, GQA, 200, False, 256, 0.0),  # a layer's backward is the peak
    ("bf16-mixed", 3, SHAPE, 6000, True, 0, 0.0),  # checkpointing, the loss in one piece
    ("bf16-mixed", 3, SHAPE, 200, True, 256, 0.05),  # checkpointing, a recomputed layer is the peak
    ("bf16-mixed", None, SHAPE, 6000, False, 256, 0.0),  # autocast over fp32 weights (1xa100)
    ("bf16-mixed", None, GQA, 200, True, 256, 0.0),
    ("32-true", None, SHAPE, 6000, False, 256, 0.0),  # the CPU default
    ("32-true", None, SHAPE, 200, False, 0, 0.05),
]


@pytest.mark.filterwarnings("ignore:Expected a tensor:UserWarning")  # MemTracker on a parameter without a gradient
@pytest.mark.parametrize("precision,stage,arch,vocab,checkpointing,chunk,dropout", CASES)
def test_plan_matches_the_memory_a_step_holds(precision, stage, arch, vocab, checkpointing, chunk, dropout):
    """Bugs caught: activations planned with GPT's 34 x s x b x h per layer (a LLaMA layer with 16-bit weights keeps
    24 h + 8 i per token: LLaMA-7B's auto micro batch would then not fit), the SwiGLU width or grouped-query attention
    ignored, the residual dropout's masks or autocast's 16-bit weight copies left out, the loss planned as whole
    logits when it runs in chunks (or as one chunk when it runs whole), checkpointing's recomputed layer missing."""
    mode = weight_mode(precision, stage)
    tokens = 1024
    measured = measured_activations(arch, vocab, tokens, mode, checkpointing, chunk, dropout)
    planned = activation_bytes(arch, vocab, tokens, mode, checkpointing, chunk, dropout)
    assert planned == pytest.approx(measured, rel=PEAK_TOLERANCE), f"plan {planned / 2**20:.1f} MiB"


def test_weight_modes():
    """Bug caught: DeepSpeed's bf16 run planned with autocast's fp32 weights (the engine casts them to 16 bits)."""
    assert weight_mode("bf16-mixed", 3) == "16-bit" and weight_mode("bf16-mixed", None) == "mixed"
    assert weight_mode("bf16-true", None) == "16-bit" and weight_mode("32-true", None) == "fp32"
