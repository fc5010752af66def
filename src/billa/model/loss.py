"""lm_head + cross-entropy over label positions in chunks, so the (N, V) fp32 logits never exist whole.

With BiLLa's 46,943-piece vocabulary the logits of a step are its largest activation: 8 x 1,024 label tokens give
(8,192 x 46,943) fp32 = 1.5 GB, twice over with their gradient, plus the bf16 copy lm_head wrote. The technique is
the one of Liger Kernel's fused linear cross-entropy, in plain torch so it runs on CPU and CUDA with any strategy: each
chunk of ``chunk_tokens`` rows runs lm_head and the loss under non-reentrant activation checkpointing, so the forward
keeps only the chunk's (n,) losses and the backward recomputes one chunk's logits at a time. Cost: lm_head's forward
runs twice (+2·N·H·V FLOPs, ~1 % of a LLaMA-7B step at V = 46,943).

Under ZeRO-3 every call of the ``lm_head`` module is a collective gather of its weight, and ranks hold different label
counts N, so a chunk loop of module calls would issue different numbers of gathers per rank and deadlock. ``HeadNLL``
makes the whole chunk loop ONE module call whose DeepSpeed hooks gather lm_head's weight (registered as its external
parameter) once before the forward and once before the backward, whatever N (0 included); the chunks then use the
gathered weight with ``F.linear``, never the module. Every chunk runs under checkpointing there, even a single one,
so no copy of the gathered weight (the padded copy ``F.linear`` would save) stays alive from the forward to the
backward; the recomputation runs after the backward gather.

The matmuls run on a copy of lm_head's weight padded with zero rows to a multiple of 64 (46,943 -> 46,976,
``aligned_head``): with an odd row count every lm_head matmul has a leading dimension that is not a multiple of 8,
and cuBLAS falls back to unaligned kernels. On an H100 (LLaMA-7B-shaped layers, 16,384 label tokens per step) those
took ~210 ms of an 800 ms step for ~7 % of its FLOPs. The extra logits are sliced off before the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ALIGN_ROWS = 64


def aligned_head(lm_head: nn.Module, hidden: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``lm_head`` as a function (n, H) -> (n, V) whose matmuls see a weight of a multiple of 64 rows.

    The padded copy is made once per call (under autocast from the already cast weight, so not once per chunk); its
    zero rows give logits that are sliced off, so loss and gradients are those of ``lm_head`` itself. Under ZeRO-3
    (parameters gathered by the module's hooks), with a bias, or with an aligned vocabulary: ``lm_head`` unchanged.
    """
    weight = lm_head.weight
    vocab = weight.shape[0]
    pad = -vocab % ALIGN_ROWS
    if pad == 0 or hasattr(weight, "ds_id") or getattr(lm_head, "bias", None) is not None:
        return lm_head
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        weight = weight.to(torch.get_autocast_dtype(device))
    padded = F.pad(weight, (0, 0, 0, pad))  # (V + pad, H), zero rows at the end
    return lambda h: F.linear(h, padded)[:, :vocab]  # (n, V), a view of aligned (n, V + pad) logits


def _chunk_nll(lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor):
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
    head = aligned_head(lm_head, hidden)
    if chunk_tokens <= 0 or hidden.shape[0] <= chunk_tokens:
        return _chunk_nll(head, hidden, labels)
    return _chunked_nll(head, hidden, labels, chunk_tokens)


def _chunked_nll(head: Callable, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """``head`` + cross-entropy chunk by chunk, each chunk checkpointed when gradients are on: shape (N,).

    N = 0 gives one empty chunk (``split`` of an empty tensor), so the result has a graph reaching ``head``'s weight.
    """
    chunks = zip(hidden.split(chunk_tokens), labels.split(chunk_tokens), strict=True)  # (n, H), (n,) each
    if not torch.is_grad_enabled():  # validation: nothing to recompute, each chunk's logits are freed at once
        return torch.cat([_chunk_nll(head, h, y) for h, y in chunks])
    return torch.cat([checkpoint(_chunk_nll, head, h, y, use_reentrant=False) for h, y in chunks])  # (N,)


def _gathered_aligned_linear(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` (n, V) through a copy of ``weight`` padded to a multiple of 64 rows, made per call.

    Per call (per chunk) rather than once per step as ``aligned_head`` does: a copy held from the forward to the
    backward would keep a whole gathered lm_head alive on every rank between the passes, which ZeRO-3 exists to avoid.
    """
    vocab = weight.shape[0]
    pad = -vocab % ALIGN_ROWS
    if pad == 0:
        return F.linear(hidden, weight)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        weight = weight.to(torch.get_autocast_dtype(device))
    return F.linear(hidden, F.pad(weight, (0, 0, 0, pad)))[:, :vocab]  # (n, V) of aligned (n, V + pad) logits


class HeadNLL(nn.Module):
    """``lm_head_nll`` as one module call, so that ZeRO-3 gathers lm_head's weight once per pass on every rank.

    Holds no parameter or buffer (checkpoints and exports are unchanged). Must be a submodule of the model DeepSpeed
    wraps, built before ``deepspeed.initialize`` (DeepSpeed hooks the modules it finds then), and ``share`` must
    register the head: DeepSpeed's hooks on this module then gather the weight before its forward and before its
    backward and release it after each, one collective per pass whatever the label count. Without ZeRO-3 it is
    ``lm_head_nll`` unchanged. The head is LLaMA's: no bias.
    """

    def share(self, lm_head: nn.Module) -> None:
        """Let this module's ZeRO-3 hooks gather ``lm_head.weight`` (no-op when the weight is not partitioned)."""
        if hasattr(lm_head.weight, "ds_id"):
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            register_external_parameter(self, lm_head.weight)

    def forward(
        self, lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
    ) -> torch.Tensor:
        """Cross-entropy (nats) of each row of ``hidden`` (N, H) against ``labels`` (N,): shape (N,).

        ``chunk_tokens`` = 0 under ZeRO-3 is the one-piece path through the ``lm_head`` module: the whole (N, V)
        logits, gathered by lm_head's own hooks (what billa did before ``HeadNLL``; kept for comparison).
        """
        weight = lm_head.weight
        if not hasattr(weight, "ds_id") or chunk_tokens <= 0:
            return lm_head_nll(lm_head, hidden, labels, chunk_tokens)
        head = functools.partial(_gathered_aligned_linear, weight)  # weight: gathered by this module's hooks
        return _chunked_nll(head, hidden, labels, chunk_tokens)


IGNORE_INDEX = -100  # label of a position that carries no loss (prompt, padding, text before a cut)


def labelled_token_nll(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 0, head_nll: HeadNLL | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (nats) of every labelled token of ``batch`` under a causal LM, and the row each belongs to.

    The one scoring path of billa: training's loss and validation (``BillaLM``), ``evaluate.py``'s perplexity
    (``EvalLM.token_nll``) and the per-source validation loss task (``billa.evaluate.val_loss``) all call this.
    Position t predicts token t + 1; labels -100 carry no loss. lm_head runs only on the labelled positions, in
    chunks of ``chunk_tokens`` (``lm_head_nll``), so prompts and padding never become (B, T, V) logits.

    Args:
        model: a ``*ForCausalLM`` (its decoder and output embedding are used).
        batch: ``input_ids`` (B, T), ``attention_mask`` ((B, T), or (B, 1, T, T) / None for packed rows),
            ``labels`` (B, T) and optionally ``position_ids`` (B, T).
        chunk_tokens: label tokens per lm_head + cross-entropy chunk; 0 = one piece.
        head_nll: the ``HeadNLL`` that computes the loss (a ``BillaLM``'s, for ZeRO-3); ``lm_head_nll`` without it.

    Returns:
        ``nll`` (N,) and ``rows`` (N,): the batch row of each labelled token, in row-major order.
    """
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),  # restarts per sample in packed rows
        use_cache=False,  # no KV cache (with one, transformers ignores packed position ids)
    ).last_hidden_state  # (B, T, H)
    head = model.get_output_embeddings()
    labels = batch["labels"][:, 1:].to(hidden.device)  # (B, T-1)
    keep = labels != IGNORE_INDEX  # (B, T-1)
    device = head.weight.device  # a model split over GPUs (evaluation's device_map) ends on lm_head's device
    hidden, labels = hidden[:, :-1][keep].to(device), labels[keep].to(device)  # (N, H), (N,)
    nll = (head_nll if head_nll is not None else lm_head_nll)(head, hidden, labels, chunk_tokens)  # (N,)
    return nll, keep.nonzero()[:, 0]
