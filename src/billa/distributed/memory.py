"""Memory plan: per-device bytes for parameters, gradients, optimizer states and activations, before training.

The arithmetic follows the ZeRO paper (Rajbhandari et al., 2020) for mixed-precision Adam: 2 bytes of 16-bit
parameters, 2 bytes of gradients and 12 bytes of fp32 master weights + Adam moments per parameter; ZeRO stage 1
partitions the optimizer states over the data-parallel ranks, stage 2 also the gradients, stage 3 also the
parameters; offload moves optimizer states (and parameters) to CPU memory. Activations follow Korthikanti et al.
(2022) with memory-efficient attention (no s^2 term): 34 x s x b x h bytes per layer, or only the layer inputs
(2 x s x b x h) when activation checkpointing recomputes the rest.
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


@dataclass(frozen=True)
class MemoryPlan:
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    capacity: float | None  # device memory in bytes, None when unknown (CPU)
    cpu_offloaded: float  # bytes per rank moved to CPU memory

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def table(self) -> str:
        rows = [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("runtime overhead", self.overhead),
            ("total per device", self.total),
        ]
        lines = [f"  {name:<18}{value / GIB:9.2f} GiB" for name, value in rows]
        cap = "unknown" if self.capacity is None else f"{self.capacity / GIB:.1f} GiB"
        lines.append(f"  {'device capacity':<18}{cap:>13}")
        if self.cpu_offloaded:
            lines.append(f"  {'CPU (offloaded)':<18}{self.cpu_offloaded / GIB:9.2f} GiB per rank")
        return "\n".join(lines)


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
) -> MemoryPlan:
    """Bytes per device for one training configuration (see the module docstring for the arithmetic)."""
    half = precision.startswith(("bf16", "16"))
    if zero_stage is not None and half:  # DeepSpeed: 16-bit weights and grads; fp32 master + m + v
        param_bytes, grad_bytes, optim_bytes = 2, 2, 12
    else:  # fp32 weights (autocast computes in 16 bits); Adam m + v
        param_bytes, grad_bytes, optim_bytes = 4, 4, 8
    zero_stage = zero_stage or 0
    shard = max(1, world_size)
    params = n_params * param_bytes / (shard if zero_stage >= 3 else 1)
    grads = n_params * grad_bytes / (shard if zero_stage >= 2 else 1)
    optim = n_params * optim_bytes / (shard if zero_stage >= 1 else 1)
    offloaded = 0.0
    if offload_optimizer:
        offloaded += optim
        optim = 0.0
    if offload_parameters and zero_stage >= 3:
        offloaded += params
        params = 0.0
    h, layers = architecture["hidden_size"], architecture["num_hidden_layers"]
    tokens = micro_batch * seq_len
    act_bytes = 2 if half else 4
    per_layer_full = 34 / 2 * act_bytes * tokens * h  # 34 s b h bytes in 16-bit
    if activation_checkpointing:
        activations = layers * tokens * h * act_bytes + per_layer_full  # layer inputs + one layer recomputed
    else:
        activations = layers * per_layer_full
    activations += tokens * vocab_size * (act_bytes + 4)  # logits + their fp32 copy for the loss
    capacity = None if capacity_gb is None else capacity_gb * GIB
    overhead = RUNTIME_OVERHEAD if capacity is not None else 0.0
    return MemoryPlan(params, grads, optim, activations, overhead, capacity, offloaded)


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
