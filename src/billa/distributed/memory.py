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
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

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
