"""lm_head + cross-entropy over label positions in chunks, so the (N, V) fp32 logits never exist whole.

With BiLLa's 46,943-piece vocabulary the logits of a step are its largest activation: 8 x 1,024 label tokens give
(8,192 x 46,943) fp32 = 1.5 GB, twice over with their gradient, plus the bf16 copy lm_head wrote. The technique is
the one of Liger Kernel's fused linear cross-entropy, in plain torch so it runs on CPU and CUDA with any strategy: each
chunk of ``chunk_tokens`` rows runs lm_head and the loss under non-reentrant activation checkpointing, so the forward
keeps only the chunk's (n,) losses and the backward recomputes one chunk's logits at a time. Calling ``lm_head`` as a
module (not its weight) keeps ZeRO-3's gather hooks working in both passes, but under ZeRO-3 every call is a
collective and ranks hold different N, so ``BillaLM`` passes ``chunk_tokens=0`` there (one piece). Cost: lm_head's
forward runs twice (+2·N·H·V FLOPs, ~1 % of a LLaMA-7B step at V = 46,943).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_nll(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden)  # (n, V)
    return F.cross_entropy(logits.float(), labels, reduction="none")  # (n,)


def lm_head_nll(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Cross-entropy (nats) of each row of ``hidden`` (N, H) against ``labels`` (N,): shape (N,).

    Args:
        lm_head: the output projection (H -> V).
        hidden: final hidden states of the label positions only, (N, H).
        labels: target ids, (N,).
        chunk_tokens: rows per chunk; N <= chunk_tokens (or 0) computes in one piece without recomputation.
    """
    if chunk_tokens <= 0 or hidden.shape[0] <= chunk_tokens:
        return _chunk_nll(lm_head, hidden, labels)
    chunks = zip(hidden.split(chunk_tokens), labels.split(chunk_tokens), strict=True)  # (n, H), (n,) each
    if not torch.is_grad_enabled():  # validation: nothing to recompute, each chunk's logits are freed at once
        return torch.cat([_chunk_nll(lm_head, h, y) for h, y in chunks])
    return torch.cat([checkpoint(_chunk_nll, lm_head, h, y, use_reentrant=False) for h, y in chunks])  # (N,)
