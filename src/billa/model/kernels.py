"""Which kernels the decoder layers run: ``compile`` (regional torch.compile) and ``model.kernels`` (Liger Kernel's
fused RMSNorm, rotary and SwiGLU on CUDA, or transformers' own modules). Checked by ``billa.config.validate`` before
any work and applied by ``BillaLM.configure_model``."""

from __future__ import annotations

from billa.utils.errors import ConfigError


def check_compile(compile_layers: object, deepspeed: bool) -> None:
    """``compile`` is true or false, and true only without DeepSpeed.

    Raises:
        ConfigError: naming ``compile`` (and ``hardware.strategy`` where DeepSpeed is the reason).
    """
    if not isinstance(compile_layers, bool):
        raise ConfigError(f"`compile`={compile_layers!r}: expected true (torch.compile each decoder layer) or false")
    if compile_layers and deepspeed:
        raise ConfigError(
            "`compile`=true with a DeepSpeed `hardware.strategy`: billa compiles decoder layers only without "
            "DeepSpeed (ZeRO-3 gathers every parameter in hooks inside the layers, and dynamo breaks the graph at "
            "each of them). Set compile=false (model.kernels=auto gives fused Liger kernels on CUDA under ZeRO-3), or "
            "use a hardware config without DeepSpeed (hardware=1xa100)"
        )


KERNELS = ("auto", "liger", "torch")


def select_kernels(requested: object, cuda: bool, importable: bool, compile_layers: bool) -> str:
    """The kernels of the decoder layers' RMSNorm, rotary and SwiGLU (``model.kernels``): ``liger`` or ``torch``.

    ``auto`` picks Liger Kernel's fused Triton kernels where they run and help: on CUDA, with ``liger_kernel``
    importable, and without ``compile=true`` (inductor already fuses the same operations in a compiled layer);
    anywhere else transformers' own modules (``torch``), so a CPU run is unchanged.

    Args:
        requested: the ``model.kernels`` value.
        cuda: the run trains on CUDA devices.
        importable: the ``liger_kernel`` package can be imported (``liger_importable``).
        compile_layers: the ``compile`` value (true: each decoder layer is compiled).

    Raises:
        ConfigError: naming ``model.kernels`` and the fix, for an unknown value or ``liger`` where it cannot run.
    """
    if requested not in KERNELS:
        raise ConfigError(
            f"`model.kernels`={requested!r}: expected auto (Liger Kernel on CUDA when installed, else torch), "
            "liger or torch"
        )
    if requested == "torch" or (requested == "auto" and not (cuda and importable and not compile_layers)):
        return "torch"
    if requested == "liger":
        if not cuda:
            raise ConfigError(
                "`model.kernels`=liger needs CUDA (Liger Kernel's kernels are Triton GPU kernels) and this run "
                "trains on CPU: set model.kernels=auto or model.kernels=torch, or use a GPU hardware config"
            )
        if not importable:
            raise ConfigError(
                "`model.kernels`=liger but the liger_kernel package is not installed: "
                'pip install -e ".[cuda]", or set model.kernels=torch'
            )
        if compile_layers:
            raise ConfigError(
                "`model.kernels`=liger with `compile`=true: a compiled layer already fuses RMSNorm, rotary and SwiGLU; "
                "choose one: compile=false, or model.kernels=auto (torch kernels, compiled)"
            )
    return "liger"


def liger_importable() -> bool:
    """Whether Liger Kernel (``pip install -e ".[cuda]"``) is installed, without importing it (it imports Triton)."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None
