"""Memory plan: per-device bytes for parameters, gradients, optimizer states and activations, before training.

States follow the ZeRO paper (Rajbhandari et al., 2020) for mixed-precision Adam: 2 bytes of 16-bit parameters, 2
bytes of gradients and 12 bytes of fp32 master weights + Adam moments per parameter; ZeRO stage 1 partitions the
optimizer states over the data-parallel ranks, stage 2 also the gradients, stage 3 also the parameters; offload moves
optimizer states (and parameters) to CPU memory. ZeRO-3 also holds gathered parameters (at most
``stage3_max_live_parameters`` elements, 16-bit) and, in the optimizer step, an fp32 copy of a sub group's gradients.

Activations are counted for the LLaMA decoder layer billa trains (transformers' ``LlamaDecoderLayer`` with SDPA,
SwiGLU, billa's residual dropout) and billa's loss (lm_head + cross-entropy over label positions, in chunks), from the
tensors each op keeps for the backward. The coefficients below were measured, not assumed: the bytes every tensor
storage holds at the peak of a forward + backward, tracked by ``torch.distributed._tools.mem_tracker.MemTracker``
(tests/test_memory_plan.py measures them again against this module for several shapes, precisions and settings).
The often quoted 34 x s x b x h bytes per layer (Korthikanti et al., 2022) is a GPT layer with a 4h GELU MLP and
dropout everywhere; a LLaMA layer with 16-bit weights keeps 24 h + 8 i bytes per token (i: the SwiGLU width), 43.5 h
at LLaMA-7B's i = 2.69 h: a plan on 34 h would under-count LLaMA-7B's activations by a fifth.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback

from billa.utils.logging import get_logger

log = get_logger(__name__)

GIB = 1024**3
RUNTIME_OVERHEAD = 2 * GIB  # CUDA context, allocator fragmentation, communication buffers (a measured rule of thumb)
ZERO3_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters
ZERO3_SUB_GROUP = 1_000_000_000  # DeepSpeed's default sub_group_size


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes one forward + backward holds beyond weights and gradients, per token unless said, for one way of holding
    the weights (h: hidden size, i: SwiGLU width; fitted on CPU over two shapes and checked on a third).

    Attributes:
        layer_h, layer_i: a decoder layer's activations kept for the backward: ``layer_h x h + layer_i x i``.
        kv_h: less per layer for grouped-query attention: ``kv_h x (1 - kv_heads / heads) x h``.
        dropout_h: more per layer with residual dropout (its masks and outputs).
        checkpoint_h: a layer's activations under activation checkpointing (its input).
        backward_h, backward_i: the peak of a layer's backward beyond what the layers keep (the loss being small).
        recompute_h, recompute_i: with checkpointing, a recomputed layer's backward beyond that layer's activations.
        loss: bytes per logit element of the largest piece of logits alive (label tokens, or a chunk, x vocabulary):
            fp32 log-softmax kept, its gradient and the gradient of the logits, whatever the weights' dtype.
        loss_h: beside the logits while the loss runs (final norm, the label positions' hidden states).
        head: bytes per lm_head weight element while chunks run: the copy padded to 64 rows and the gradient flowing
            back to the weight (under ZeRO-3 the gathered weight's gradient instead of a copy).
        weight_copy: bytes per decoder-layer matmul weight element that autocast keeps as a 16-bit copy from the
            forward to the backward (every layer; one layer under checkpointing).
    """

    layer_h: float
    layer_i: float
    kv_h: float
    dropout_h: float
    checkpoint_h: float
    backward_h: float
    backward_i: float
    recompute_h: float
    recompute_i: float
    loss: float
    loss_h: float
    head: float
    weight_copy: float = 0.0


ACTIVATION_BYTES = {
    # 16-bit weights (DeepSpeed's bf16 engine, bf16-true): no autocast, every activation 16-bit
    "16-bit": ActivationBytes(24, 8, 4, 4, 2, 20, 2, -2, 6, 12, 10, 4),
    # fp32 weights + 16-bit autocast (bf16-mixed without DeepSpeed): fp32 residual stream and norms
    "mixed": ActivationBytes(34, 8, 4, 4, 4, 16, 3.4, -2, 5, 12, 17, 4, weight_copy=2),
    # fp32 weights and activations (32-true)
    "fp32": ActivationBytes(40, 16, 8, 8, 4, -4, 11.4, -8, 11.5, 12, 16, 8),
}


def weight_mode(precision: str, zero_stage: int | None) -> str:
    """``16-bit``, ``mixed`` or ``fp32``: how a run with this precision holds its weights (DeepSpeed casts them)."""
    if not precision.startswith(("bf16", "16")):
        return "fp32"
    return "16-bit" if zero_stage is not None or "true" in precision else "mixed"


@dataclass(frozen=True)
class MemoryPlan:
    parameters: float
    gradients: float
    optimizer: float
    activations: float  # the peak of forward + backward beyond the states (ZeRO-3's gathered parameters included)
    overhead: float
    capacity: float | None  # device memory in bytes, None when unknown (CPU)
    cpu_offloaded: float  # bytes per rank moved to CPU memory
    step: float = 0.0  # the optimizer step's temporaries (ZeRO: an fp32 copy of a sub group's gradients)
    gathered: float = 0.0  # ZeRO-3: parameters gathered at once (part of ``activations``' phase)

    @property
    def total(self) -> float:
        """States + the larger of the forward/backward peak and the optimizer step's + runtime overhead."""
        return self.parameters + self.gradients + self.optimizer + max(self.activations, self.step) + self.overhead

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def table(self) -> str:
        rows = [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations - self.gathered),
        ]
        if self.gathered:
            rows.append(("ZeRO-3 gathered", self.gathered))
        if self.step > self.activations:
            rows.append(("optimizer step", self.step))  # its peak replaces the activations' (they are freed)
        rows += [("runtime overhead", self.overhead), ("total per device", self.total)]
        lines = [f"  {name:<18}{value / GIB:9.2f} GiB" for name, value in rows]
        cap = "unknown" if self.capacity is None else f"{self.capacity / GIB:.1f} GiB"
        lines.append(f"  {'device capacity':<18}{cap:>13}")
        if self.cpu_offloaded:
            lines.append(f"  {'CPU (offloaded)':<18}{self.cpu_offloaded / GIB:9.2f} GiB per rank")
        return "\n".join(lines)


def activation_bytes(
    architecture: Mapping,
    vocab_size: int,
    tokens: int,
    mode: str,
    activation_checkpointing: bool = False,
    loss_chunk_tokens: int = 0,
    residual_dropout: float = 0.0,
) -> float:
    """Peak bytes of one forward + backward beyond weights and gradients (see ``ActivationBytes``).

    The peak is what the layers keep plus the larger of two moments: the loss's backward (the largest live piece of
    logits) and a layer's backward (with checkpointing: a layer recomputed whole). Every token is taken to carry a
    label (stage 1), the most the loss can hold.

    Args:
        architecture: ``model.architecture`` (hidden_size, intermediate_size, num_hidden_layers, heads).
        vocab_size: lm_head rows.
        tokens: micro batch x sequence length.
        mode: ``weight_mode(precision, zero_stage)``.
        activation_checkpointing: layers keep only their inputs and are recomputed in the backward.
        loss_chunk_tokens: label tokens per lm_head + loss chunk (0: one piece).
        residual_dropout: ``model.residual_dropout`` (its masks are kept when > 0).
    """
    c = ACTIVATION_BYTES[mode]
    h, layers = architecture["hidden_size"], architecture["num_hidden_layers"]
    i = architecture.get("intermediate_size") or 4 * h
    heads = architecture.get("num_attention_heads") or 1
    kv_share = (architecture.get("num_key_value_heads") or heads) / heads
    layer = c.layer_h * h + c.layer_i * i - c.kv_h * (1 - kv_share) * h + (c.dropout_h * h if residual_dropout else 0)
    matmul_weights = 2 * h * h + 2 * h * h * kv_share + 3 * h * i  # q, o; k, v; gate, up, down
    if activation_checkpointing:
        kept = layers * c.checkpoint_h * h * tokens + c.weight_copy * matmul_weights
        layer_phase = (layer + c.recompute_h * h + c.recompute_i * i) * tokens
    else:
        kept = layers * (layer * tokens + c.weight_copy * matmul_weights)
        layer_phase = (c.backward_h * h + c.backward_i * i) * tokens
    if 0 < loss_chunk_tokens < tokens:  # chunks: one chunk's logits while lm_head's weight gets its gradient
        logits = c.loss * loss_chunk_tokens * vocab_size + c.head * (vocab_size - vocab_size % -64) * h
    else:  # one piece: the logits' backward peaks before lm_head's
        logits = c.loss * tokens * vocab_size
    return kept + max(logits + c.loss_h * h * tokens, layer_phase)


def plan_memory(
    n_params: int,
    architecture: Mapping,
    vocab_size: int,
    micro_batch: int,
    seq_len: int,
    world_size: int,
    precision: str,
    zero_stage: int | None = None,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    activation_checkpointing: bool = False,
    capacity_gb: float | None = None,
    loss_chunk_tokens: int = 0,
    residual_dropout: float = 0.0,
    zero: Mapping | None = None,
) -> MemoryPlan:
    """Bytes per device for one training configuration (see the module docstring for the arithmetic).

    Args:
        zero: the DeepSpeed config's ``zero_optimization`` block (``stage3_max_live_parameters``, ``sub_group_size``;
            DeepSpeed's defaults when absent).
    """
    mode = weight_mode(precision, zero_stage)
    if zero_stage is not None and mode == "16-bit":  # DeepSpeed: 16-bit weights and grads; fp32 master + m + v
        param_bytes, grad_bytes, optim_bytes = 2, 2, 12
    elif mode == "16-bit":  # bf16-true without DeepSpeed: torch AdamW keeps m and v in the weights' dtype
        param_bytes, grad_bytes, optim_bytes = 2, 2, 4
    else:  # fp32 weights (autocast computes in 16 bits); Adam m + v
        param_bytes, grad_bytes, optim_bytes = 4, 4, 8
    zero_stage = zero_stage or 0
    zero = zero or {}
    shard = max(1, world_size)
    params = n_params * param_bytes / (shard if zero_stage >= 3 else 1)
    grads = n_params * grad_bytes / (shard if zero_stage >= 2 else 1)
    optim = n_params * optim_bytes / (shard if zero_stage >= 1 else 1)
    step = 0.0
    if zero_stage >= 3 and mode == "16-bit" and not offload_optimizer:  # fp32 gradients of one sub group
        step = 4 * min(int(zero.get("sub_group_size") or ZERO3_SUB_GROUP), n_params / shard)
    offloaded = 0.0
    if offload_optimizer:
        offloaded += optim
        optim = 0.0
    if offload_parameters and zero_stage >= 3:
        offloaded += params
        params = 0.0
    tokens = micro_batch * seq_len
    activations = activation_bytes(
        architecture, vocab_size, tokens, mode, activation_checkpointing, loss_chunk_tokens, residual_dropout
    )
    gathered = 0.0
    if zero_stage >= 3:  # whole 16-bit parameters of the layers in flight, prefetched and kept for reuse
        gathered = 2 * min(int(zero.get("stage3_max_live_parameters") or ZERO3_LIVE_PARAMETERS), n_params)
    capacity = None if capacity_gb is None else capacity_gb * GIB
    overhead = RUNTIME_OVERHEAD if capacity is not None else 0.0
    return MemoryPlan(params, grads, optim, activations + gathered, overhead, capacity, offloaded, step, gathered)


def measure_activations(module, batch: dict, mode: str) -> int:
    """Peak bytes one ``module.token_nll`` forward + backward holds beyond weights and buffers, measured.

    ``torch.distributed._tools.mem_tracker.MemTracker`` follows every tensor storage the ops allocate and free (CPU
    or CUDA, no allocator statistics needed). Gradients are dropped as soon as they are accumulated, as into ZeRO's
    reduce buckets (the plan counts them as states). ``mode`` (``weight_mode``): ``16-bit`` casts the model to bf16
    (DeepSpeed's engine), ``mixed`` runs the forward under bf16 autocast, ``fp32`` as it is. For the plan's checks
    (tests/test_memory_plan.py, benchmarks/memory_plan.py); changes ``module`` (dtype, gradient hooks).
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    if mode == "16-bit":
        module.model.to(torch.bfloat16)
    for param in module.parameters():
        param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    device = next(module.parameters()).device
    tracker = MemTracker()
    tracker.track_external(module, *(v for v in batch.values() if isinstance(v, torch.Tensor)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mode == "mixed" else contextlib.nullcontext()
    with tracker:
        with autocast:
            nll, _ = module.token_nll(batch)
        nll.mean().backward()
    peak = {getattr(k, "name", k): v for k, v in tracker.get_tracker_snapshot("peak")[device].items()}
    return int(peak["Total"] - peak["PARAM"] - peak["BUFFER"])


def partition_report(model) -> dict:
    """What this rank really holds: local vs full element counts (ZeRO-3 parameters expose ``ds_numel``)."""
    local = shard = full = empty = count = 0
    for param in model.parameters():
        count += 1
        local += param.numel()  # 0 for a partitioned parameter outside a gather
        shard += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()  # this rank's slice
        full += getattr(param, "ds_numel", param.numel())
        empty += param.numel() == 0
    return {
        "parameters": count,
        "local_numel": local,
        "shard_numel": shard,
        "full_numel": full,
        "empty_parameters": empty,
    }


class _Peak:
    numel = 0


@contextlib.contextmanager
def track_materialised():
    """Record the most parameter elements held in memory at once by parameters created inside the block.

    Under ZeRO-3 each submodule's parameters are partitioned (``numel() == 0``) right after the submodule is built,
    so the peak is about one submodule's size; building the whole model first and partitioning later peaks at the
    full model. Yields an object whose ``numel`` holds the peak when the block ends.
    """
    peak, live = _Peak(), []

    def on_register(module, name, param):
        if param is not None:
            live.append(weakref.ref(param))
            peak.numel = max(peak.numel, sum(p.numel() for ref in live if (p := ref()) is not None))

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(on_register)
    try:
        yield peak
    finally:
        handle.remove()


# ---- the plan against the GPU: predicted vs measured peak after a few steps ----------------------------------------

PEAK_CHECK_STEP = 2  # optimizer steps before the measurement: the first steps allocate optimizer states and buckets
PEAK_TOLERANCE = 0.10  # the plan's goal: within 10 % of the measured peak


def compare_peak(plan: MemoryPlan, measured: float) -> dict:
    """The plan's predicted peak next to ``torch.cuda.max_memory_allocated``.

    The allocator's peak counts tensors only, so it is compared with the plan's total less its runtime overhead
    (CUDA context, fragmentation and communication buffers live outside the allocator's count).

    Returns:
        ``memory/plan_gib``, ``memory/peak_gib``, ``memory/peak_over_plan`` (measured / predicted) and ``message``.
    """
    predicted = plan.total - plan.overhead
    ratio = measured / predicted if predicted else float("inf")
    verdict = "within" if abs(ratio - 1) <= PEAK_TOLERANCE else "outside"
    message = (
        f"Memory plan vs GPU after step {PEAK_CHECK_STEP}: predicted {predicted / GIB:.2f} GiB, measured peak "
        f"{measured / GIB:.2f} GiB (torch.cuda.max_memory_allocated), {ratio - 1:+.1%}: {verdict} the plan's "
        f"{PEAK_TOLERANCE:.0%} goal"
    )
    return {
        "memory/plan_gib": predicted / GIB,
        "memory/peak_gib": measured / GIB,
        "memory/peak_over_plan": ratio,
        "message": message,
    }


class PeakMemoryCheck(Callback):
    """After ``PEAK_CHECK_STEP`` optimizer steps on a CUDA device, log the plan's predicted peak vs the measured one
    (metrics ``memory/*``, a log line, and ``<out_dir>/memory_check.json`` on rank 0). Does nothing on a CPU.

    Args:
        plan: the memory plan the run was checked with (``billa.train.check_memory``).
        out_dir: where ``memory_check.json`` goes (None: not written).
        measure: ``device -> peak bytes``; default ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, plan: MemoryPlan, out_dir: str | None = None, measure=None):
        self.plan, self.out_dir, self.measure = plan, out_dir, measure
        self.result: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.result is not None or trainer.global_step < PEAK_CHECK_STEP:
            return
        if self.measure is None and pl_module.device.type != "cuda":
            return
        measured = (self.measure or torch.cuda.max_memory_allocated)(pl_module.device)
        self.result = compare_peak(self.plan, float(measured))
        if not trainer.is_global_zero:
            return
        log.info(self.result["message"])
        metrics = {k: v for k, v in self.result.items() if k.startswith("memory/")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.out_dir:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            Path(self.out_dir, "memory_check.json").write_text(json.dumps(self.result, indent=1))
