"""Can this machine run the chosen hardware config? Checked first, before any tokenisation, logger or memory plan.

Without it ``python train.py stage=sft hardware=8xa100`` on a CPU machine tokenises, prints the memory plan, opens
a W&B run and only then fails deep in Lightning ("No supported gpu backend found!"). ``check_machine`` stops at
once with a ``billa: error:`` naming ``conf/hardware/<choice>.yaml``, what the machine has and the config to use.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from omegaconf import DictConfig

from billa.model_card import hardware_file
from billa.utils.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")


@dataclass(frozen=True)
class Machine:
    """What this machine offers the trainer.

    Attributes:
        gpus: names of the CUDA devices torch sees (empty: none).
        bf16: every visible GPU computes in bf16 (``torch.cuda.is_bf16_supported``).
        flash_attn: the ``flash_attn`` package is installed.
        torch_cuda: the CUDA version torch was built with (None: a CPU-only build).
    """

    gpus: list[str] = field(default_factory=list)
    bf16: bool = False
    flash_attn: bool = False
    torch_cuda: str | None = None

    @classmethod
    def detect(cls) -> Machine:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = [torch.cuda.get_device_name(i) for i in range(count)]
        return cls(
            gpus=gpus,
            bf16=bool(gpus) and torch.cuda.is_bf16_supported(),
            flash_attn=importlib.util.find_spec("flash_attn") is not None,
            torch_cuda=torch.version.cuda,
        )


def check_machine(cfg: DictConfig, machine: Machine | None = None, choice: str | None = None) -> None:
    """Stop when this machine cannot run ``cfg.hardware`` (and ``model.attn_implementation``, where set).

    Args:
        cfg: a composed ``train.yaml`` or ``evaluate.yaml``.
        machine: what the machine has (default: ``Machine.detect()``).
        choice: the hardware config's name for the message (default: the running Hydra job's choice).

    Raises:
        ConfigError: no CUDA device, fewer GPUs than ``hardware.devices``, bf16 on a GPU without it, or
            flash-attention requested but not installed; naming the file, what the machine has and the fix.
    """
    machine = machine or Machine.detect()
    hw, where = cfg.hardware, hardware_file(choice)
    if str(hw.accelerator) in GPU_ACCELERATORS:
        _check_gpus(hw, machine, where)
    impl = str((cfg.get("model") or {}).get("attn_implementation") or "")
    if "flash" in impl and not machine.flash_attn:
        raise ConfigError(
            f"`model.attn_implementation`={impl}, but the flash_attn package is not installed on this machine. "
            "Install it (pip install flash-attn --no-build-isolation, on a CUDA machine) or set "
            "model.attn_implementation=sdpa"
        )


def _check_gpus(hw: DictConfig, machine: Machine, where: str) -> None:
    if not machine.gpus:
        build = "a CPU-only torch build" if machine.torch_cuda is None else f"torch built for CUDA {machine.torch_cuda}"
        raise ConfigError(
            f"{where} trains on GPUs (hardware.accelerator={hw.accelerator}, hardware.devices={hw.devices}), but "
            f"this machine has no CUDA device ({build}). Run it on a GPU node, or use hardware=cpu_zero3 (the same "
            "DeepSpeed ZeRO-3 engine on 2 CPU processes) or hardware=cpu here"
        )
    have = len(machine.gpus)
    if hw.devices > have:
        names = ", ".join(sorted(set(machine.gpus)))
        raise ConfigError(
            f"{where} asks for hardware.devices={hw.devices} GPUs per node, but this machine has {have} ({names}). "
            f"Set hardware.devices={have} (gradient accumulation rises to keep batch.global_size), or run on a node "
            f"with {hw.devices} GPUs"
        )
    if str(hw.precision).startswith("bf16") and not machine.bf16:
        deepspeed = not isinstance(hw.strategy, str) and "bf16" in (hw.strategy.get("config") or {})
        also = " and hardware.strategy.config.bf16.enabled=false" if deepspeed else ""
        raise ConfigError(
            f"{where} sets hardware.precision={hw.precision}, but this machine's GPU ({machine.gpus[0]}) has no "
            f"bf16 support. Set hardware.precision=16-mixed{also} (fp16 with loss scaling), or run on an Ampere or "
            "newer GPU (A100, H100)"
        )
