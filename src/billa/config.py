"""Derived settings and validation: what Hydra composes is checked here once, with errors that name the keys."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from billa.model.kernels import check_compile, liger_importable, select_kernels
from billa.model_card import hardware_file
from billa.utils.errors import ConfigError, exit_on_error
from billa.utils.logging import get_logger

if TYPE_CHECKING:  # billa.model and the benchmarks import this module on machines without Hydra/OmegaConf
    from omegaconf import DictConfig


log = get_logger(__name__)


def exit_on_config_error() -> contextlib.AbstractContextManager[None]:
    """``billa.utils.errors.exit_on_error``: a ``ConfigError`` (or any error billa raises on purpose) becomes one
    ``billa: error:`` block and exit status 2; ``HYDRA_FULL_ERROR=1`` shows the stack trace."""
    return exit_on_error()


def _positive_int(cfg: DictConfig, key: str, also: str = "") -> int:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`{key}` must be a positive integer{also}, got {value!r}")
    return value


AUTO = "auto"
AUTO_MEMORY_FRACTION = 0.9  # `auto` keeps the planned peak within 90 % of hardware.gpu_memory_gb: the plan's margin


@dataclass(frozen=True)
class AutoChoice:
    """What ``resolve_auto`` chose for the hardware keys set to ``auto``, and the memory plan it chose by.

    Attributes:
        micro_size: the micro batch per device.
        activation_checkpointing: recompute activations in the backward pass.
        micro_auto: ``hardware.micro_batch_size`` was ``auto``.
        checkpointing_auto: ``hardware.activation_checkpointing`` was ``auto``.
        planned: the memory plan's total per device for the choice, in bytes.
        usable: ``AUTO_MEMORY_FRACTION`` x ``hardware.gpu_memory_gb`` in bytes (None: capacity unknown).
    """

    micro_size: int
    activation_checkpointing: bool
    micro_auto: bool
    checkpointing_auto: bool
    planned: float | None = None
    usable: float | None = None

    def __str__(self) -> str:
        parts = []
        if self.micro_auto:
            parts.append(f"micro batch auto -> {self.micro_size}")
        if self.checkpointing_auto:
            parts.append(f"activation checkpointing auto -> {'on' if self.activation_checkpointing else 'off'}")
        if self.usable is None:
            return ", ".join(parts) + " (device memory unknown: hardware.gpu_memory_gb is null)"
        gib = 1024**3
        return (
            ", ".join(parts) + f" (plan: {self.planned / gib:.1f} GiB of {self.usable / gib:.1f} GiB usable, "
            f"{AUTO_MEMORY_FRACTION:.0%} of hardware.gpu_memory_gb)"
        )


def resolve_auto(cfg: DictConfig, vocab_size: int | None = None) -> AutoChoice | None:
    """Replace ``hardware.micro_batch_size=auto`` and ``hardware.activation_checkpointing=auto`` in ``cfg`` by the
    values the memory plan chooses, once, so everything after reads integers and booleans.

    The choice is a function of the config alone (same on every rank, node and resume): the micro batches tried are
    the divisors of the per-device share of the global batch (``batch.global_size / (devices x num_nodes)``; with
    ``data.exact_mix_per_rank`` only multiples of the mix cycle), largest first, with activation checkpointing off;
    checkpointing is turned on only when no micro batch fits without it. A plan fits when its total per device is
    at most ``AUTO_MEMORY_FRACTION`` x ``hardware.gpu_memory_gb``; accumulation follows (``plan_batch``).
    With ``hardware.gpu_memory_gb`` null (a CPU) there is nothing to fit: checkpointing ``auto`` is off and a
    micro batch ``auto`` is refused.

    Args:
        cfg: the composed training config; its ``hardware`` node is changed in place.
        vocab_size: embedding rows; default ``model.vocab_size``, or the tokenizer's size when that is null.

    Returns:
        The choice (None when neither key is ``auto``).

    Raises:
        ConfigError: no micro batch divides the share, the capacity is unknown, or nothing fits (unless
            ``memory_check=false``: then the smallest plan is taken).
    """
    from omegaconf import read_write

    hw = cfg.hardware
    micro_auto, checkpointing_auto = hw.micro_batch_size == AUTO, hw.activation_checkpointing == AUTO
    if not checkpointing_auto and not isinstance(hw.activation_checkpointing, bool):
        raise ConfigError(
            f"`hardware.activation_checkpointing`={hw.activation_checkpointing!r}: expected true, false or auto"
        )
    if not (micro_auto or checkpointing_auto):
        return None
    micros = _auto_micro_sizes(cfg) if micro_auto else [_positive_int(cfg, "hardware.micro_batch_size", " or auto")]
    checkpointing = [False, True] if checkpointing_auto else [hw.activation_checkpointing]
    capacity = hw.get("gpu_memory_gb")
    if capacity is None:
        if micro_auto:
            raise ConfigError(
                f"`hardware.micro_batch_size`=auto chooses the micro batch from the memory plan against "
                f"hardware.gpu_memory_gb, which is null here ({hardware_file()}: a CPU or an unknown device). Set "
                f"hardware.micro_batch_size to a number (one of {micros} divides the global batch), or "
                "hardware.gpu_memory_gb to the device memory in GiB"
            )
        choice = AutoChoice(micros[0], False, micro_auto, checkpointing_auto)
    else:
        choice = _fit(cfg, vocab_size, micros, checkpointing, capacity, micro_auto, checkpointing_auto)
    with read_write(hw):
        hw.micro_batch_size, hw.activation_checkpointing = choice.micro_size, choice.activation_checkpointing
    return choice


def _auto_micro_sizes(cfg: DictConfig) -> list[int]:
    """Micro batches ``auto`` may take, largest first: divisors of the global batch's per-device share."""
    global_size = _positive_int(cfg, "batch.global_size")
    devices = _positive_int(cfg, "hardware.devices")
    nodes = _positive_int(cfg, "hardware.num_nodes")
    world = devices * nodes
    if global_size % world:
        raise ConfigError(
            f"batch.global_size={global_size} does not divide over hardware.devices={devices} x "
            f"hardware.num_nodes={nodes} = {world} ranks, so hardware.micro_batch_size=auto has no micro batch to "
            f"choose: change batch.global_size to a multiple of {world}"
        )
    share = global_size // world
    sizes = [m for m in range(share, 0, -1) if share % m == 0]
    if cfg.data.get("exact_mix_per_rank") and cfg.data.get("mix_mode") == "round_robin":
        cycle = sum(int(w) for w in (cfg.data.get("mix") or {}).values())
        sizes = [m for m in sizes if cycle and m % cycle == 0] or sizes  # none: validate names the mix cycle
    return sizes


def _fit(
    cfg: DictConfig,
    vocab_size: int | None,
    micros: list[int],
    checkpointing: list[bool],
    capacity_gb: float,
    micro_auto: bool,
    checkpointing_auto: bool,
) -> AutoChoice:
    """The first (checkpointing, micro batch) in order whose memory plan fits ``AUTO_MEMORY_FRACTION`` x capacity."""
    from billa.distributed.memory import GIB

    usable = AUTO_MEMORY_FRACTION * capacity_gb * GIB
    plan = _memory_planner(cfg, vocab_size if vocab_size is not None else _planning_vocab(cfg))
    for recompute in checkpointing:
        for micro in micros:
            total = plan(micro, recompute).total
            if total <= usable:
                return AutoChoice(micro, recompute, micro_auto, checkpointing_auto, total, usable)
    micro, recompute = micros[-1], checkpointing[-1]
    smallest = plan(micro, recompute).total
    if cfg.get("memory_check", True):
        raise ConfigError(
            f"model={cfg.model.name} with this hardware config needs ~{smallest / GIB:.1f} GiB per device even at "
            f"micro batch {micro} with activation checkpointing {'on' if recompute else 'off'}, but "
            f"hardware.gpu_memory_gb={capacity_gb} leaves {usable / GIB:.1f} GiB ({AUTO_MEMORY_FRACTION:.0%}) for it. "
            "Use more devices or a ZeRO offload hardware config (hardware=8xa100-offload); set memory_check=false "
            "to try the smallest plan anyway."
        )
    log.warning("memory_check=false: no micro batch fits the memory plan; trying micro batch %d", micro)
    return AutoChoice(micro, recompute, micro_auto, checkpointing_auto, smallest, usable)


def _memory_planner(cfg: DictConfig, vocab_size: int, seq_len: int | None = None):
    """``(micro batch, checkpointing) -> MemoryPlan`` for this config's model, hardware, sequence length and loss."""
    from omegaconf import OmegaConf

    from billa.distributed.memory import plan_memory
    from billa.model.builders import count_parameters

    hw, arch = cfg.hardware, cfg.model.architecture
    strategy = hw.strategy
    deepspeed = None if isinstance(strategy, str) else OmegaConf.to_container(strategy.get("config"), resolve=True)
    stage, offload_optimizer, offload_parameters = zero_settings(deepspeed)
    n_params = count_parameters(arch, vocab_size)
    world = hw.devices * hw.num_nodes
    seq_len = seq_len or _positive_int(cfg, "data.max_seq_length")
    chunk = int(cfg.get("loss_chunk_tokens") or 0)
    dropout = float(cfg.model.get("residual_dropout") or 0.0)
    zero = (deepspeed or {}).get("zero_optimization")

    def plan(micro: int, recompute: bool):
        return plan_memory(
            n_params, arch, vocab_size, micro, seq_len, world, str(hw.precision), stage, offload_optimizer,
            offload_parameters, recompute, hw.get("gpu_memory_gb"), chunk, dropout, zero,
        )  # fmt: skip

    return plan


def memory_plan(cfg: DictConfig, batch: BatchPlan, vocab_size: int, seq_len: int | None = None):
    """The memory plan of a resolved config (``plan_batch`` done: micro batch and checkpointing are fixed).

    ``seq_len``: the data module's sequence length (default ``data.max_seq_length``).
    """
    micro, recompute = batch.micro_size, bool(cfg.hardware.activation_checkpointing)
    return _memory_planner(cfg, vocab_size, seq_len)(micro, recompute)


def _planning_vocab(cfg: DictConfig) -> int:
    """Embedding rows for the memory plan: ``model.vocab_size``, or the tokenizer's size when that is null."""
    rows = cfg.model.get("vocab_size")
    if rows is not None:
        return int(rows)  # billa.train.embedding_rows checks it against the tokenizer once that is loaded
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from billa.tokenizer.load import load_tokenizer

    try:
        return len(load_tokenizer(instantiate(cfg.model.tokenizer)))
    except (OSError, InstantiationException) as err:
        raise ConfigError(
            "`hardware.micro_batch_size`/`hardware.activation_checkpointing`=auto plan memory with the vocabulary "
            f"size (embedding rows, logits), but the tokenizer (model.tokenizer) could not be read: {err}. Set "
            "model.vocab_size to the tokenizer's size, or hardware.micro_batch_size and "
            "hardware.activation_checkpointing to fixed values"
        ) from err


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is laid out over devices and accumulation steps."""

    global_size: int
    micro_size: int
    devices: int
    num_nodes: int
    accumulation: int
    auto: AutoChoice | None = field(default=None, compare=False)  # set when `auto` chose the micro batch

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def __str__(self) -> str:
        return (
            f"global batch {self.global_size} = micro {self.micro_size} x {self.devices} devices x "
            f"{self.num_nodes} nodes x {self.accumulation} accumulation"
        )


def plan_batch(cfg: DictConfig, vocab_size: int | None = None) -> BatchPlan:
    """Derive gradient accumulation from ``batch.global_size`` and the hardware, or explain why it does not divide.

    ``auto`` hardware values are resolved first (``resolve_auto``, with ``vocab_size``), in ``cfg`` itself.

    Raises:
        ConfigError: naming ``batch.global_size``, ``hardware.micro_batch_size``, ``hardware.devices`` and
            ``hardware.num_nodes`` with the values that would divide evenly.
    """
    auto = resolve_auto(cfg, vocab_size)
    global_size = _positive_int(cfg, "batch.global_size")
    micro = _positive_int(cfg, "hardware.micro_batch_size", " or auto")
    devices = _positive_int(cfg, "hardware.devices")
    nodes = _positive_int(cfg, "hardware.num_nodes")
    per_step = micro * devices * nodes
    if global_size % per_step:
        fitting = [m for m in range(1, global_size + 1) if global_size % (m * devices * nodes) == 0]
        raise ConfigError(
            f"batch.global_size={global_size} is not a multiple of hardware.micro_batch_size={micro} x "
            f"hardware.devices={devices} x hardware.num_nodes={nodes} = {per_step}. "
            f"With these devices, hardware.micro_batch_size may be one of {fitting or 'none'}; "
            f"or change batch.global_size to a multiple of {per_step}."
        )
    return BatchPlan(global_size, micro, devices, nodes, global_size // per_step, auto)


def zero_settings(strategy_config: Mapping | None) -> tuple[int | None, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) from a DeepSpeed config (stage None without one)."""
    if strategy_config is None:
        return None, False, False
    zero = strategy_config.get("zero_optimization") or {}

    def offloaded(key: str) -> bool:
        return ((zero.get(key) or {}).get("device") or "none") != "none"

    return int(zero.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param")


@dataclass(frozen=True)
class HardwarePlan:
    """What the hardware group implies for training, derived once (``plan_hardware``) and passed on.

    Attributes:
        batch: the batch layout (``plan_batch``).
        precision: ``hardware.precision`` as a string (``32-true``, ``bf16-mixed``, ...).
        deepspeed: the strategy's DeepSpeed config with the micro batch filled in; None without DeepSpeed.
        zero_stage: the ZeRO stage (None without DeepSpeed).
        offload_optimizer: ZeRO keeps optimizer states on the CPU.
        offload_parameters: ZeRO keeps parameters on the CPU.
        clips_in_module: BillaLM clips gradients itself (bf16-mixed without DeepSpeed and a fused optimizer:
            Lightning's mixed-precision plugin refuses ``gradient_clip_val`` with an optimizer that unscales inside
            its step, a rule for fp16 loss scaling; bf16 has no loss scale, so clipping before the step is exact).
        optimizer: the ``optimizer`` node adapted to strategy and precision (``_adapt_optimizer``).
    """

    batch: BatchPlan
    precision: str
    deepspeed: dict | None
    zero_stage: int | None
    offload_optimizer: bool
    offload_parameters: bool
    clips_in_module: bool
    optimizer: dict


def plan_hardware(cfg: DictConfig, batch: BatchPlan | None = None) -> HardwarePlan:
    """The hardware plan of a composed training config (``batch`` defaults to ``plan_batch(cfg)``)."""
    from omegaconf import OmegaConf

    batch = batch or plan_batch(cfg)
    strategy = cfg.hardware.strategy
    deepspeed = None
    if not isinstance(strategy, str) and "config" in strategy:
        deepspeed = OmegaConf.to_container(strategy.config, resolve=True)
        deepspeed["train_micro_batch_size_per_gpu"] = batch.micro_size
    stage, offload_optimizer, offload_parameters = zero_settings(deepspeed)
    precision = str(cfg.hardware.precision)
    fused = bool(cfg.optimizer.get("fused", False))
    clips = deepspeed is None and precision.startswith("bf16") and "mixed" in precision and fused
    optimizer = _adapt_optimizer(OmegaConf.to_container(cfg.optimizer, resolve=True), precision, deepspeed, clips)
    return HardwarePlan(batch, precision, deepspeed, stage, offload_optimizer, offload_parameters, clips, optimizer)


def _adapt_optimizer(node: dict, precision: str, deepspeed: dict | None, clips_in_module: bool) -> dict:
    """The optimizer node, adapted to the strategy and precision where a library requires it.

    - ZeRO optimizer offload: torch AdamW becomes DeepSpeed's CPU Adam with the same hyperparameters (DeepSpeed
      refuses a torch optimizer when optimizer states live on the CPU; its AVX Adam is also faster there).
    - fp16 mixed precision without DeepSpeed: Lightning's loss scaler cannot unscale before a fused optimizer's
      step, so ``fused`` is dropped there. bf16-mixed keeps it (BillaLM clips, see ``HardwarePlan.clips_in_module``).
    """
    if zero_settings(deepspeed)[1] and node["_target_"] == "torch.optim.AdamW":
        node = {**node, "_target_": "deepspeed.ops.adam.DeepSpeedCPUAdam", "adamw_mode": True}
        node.pop("fused", None)
        log.info("ZeRO optimizer offload: using deepspeed.ops.adam.DeepSpeedCPUAdam (AdamW mode)")
    elif deepspeed is None and "mixed" in precision and not clips_in_module and node.pop("fused", None):
        log.info("%s precision without DeepSpeed: fused AdamW off (loss scaling)", precision)
    return node


ON_ERROR = ("raise", "skip")
RESUME = (None, "auto", "never")


def _check_model_dir(value: str | None, key: str, local_only: bool) -> None:
    """A HF model directory named by ``key`` exists and holds config.json (``local_only``: when it looks local)."""
    if value is None:
        return
    looks_local = str(value).startswith(("/", "./", "../", "~"))
    if not (local_only or looks_local):
        return  # could be a hub id ("org/name"); from_pretrained reports that one
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"`{key}`={value}: no such directory (expected a HF model directory with config.json)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"`{key}`={value}: not a HF model directory (no config.json); point it at the export")


def validate(cfg: DictConfig, vocab_size: int | None = None) -> BatchPlan:
    """Check the composed training config before anything heavy starts; returns the batch plan (``auto`` hardware
    values resolved in ``cfg``, see ``resolve_auto``)."""
    plan = plan_batch(cfg, vocab_size)
    on_error = cfg.data.on_error
    if on_error not in ON_ERROR:
        raise ConfigError(
            f"`data.on_error`={on_error!r}: expected raise (stop at the first bad record, naming file and line) "
            "or skip (count bad records and report them at the end)"
        )
    if cfg.get("resume") not in RESUME:
        raise ConfigError(
            f"`resume`={cfg.get('resume')!r}: expected auto (continue from the newest complete checkpoint in "
            "output_dir/checkpoints) or null; to resume a given checkpoint set ckpt_path"
        )
    _check_model_dir(cfg.get("init_from"), "init_from", local_only=True)
    _check_model_dir(cfg.model.get("pretrained_path"), "model.pretrained_path", local_only=False)
    _positive_int(cfg, "trainer.max_steps")
    _positive_int(cfg, "data.max_seq_length")
    _positive_int(cfg, "val_every_n_steps")
    check_mix_overrides(_command_line_overrides())
    mix = cfg.data.get("mix") or {}
    if not mix:
        raise ConfigError("`data.mix` is empty: the stage must name at least one source with a weight")
    sources = cfg.data.get("sources") or {}
    mode = cfg.data.mix_mode
    if mode not in ("round_robin", "probability"):
        raise ConfigError(f"`data.mix_mode`={mode!r}: expected round_robin (BiLLa) or probability")
    for name, weight in mix.items():
        integer = isinstance(weight, int) and not isinstance(weight, bool)
        if mode == "round_robin" and (not integer or weight < 1):
            raise ConfigError(f"`data.mix.{name}` must be a positive integer weight (round robin), got {weight!r}")
        if mode == "probability" and (isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0):
            raise ConfigError(f"`data.mix.{name}` must be a positive number (probability mixing), got {weight!r}")
        if name not in sources:
            raise ConfigError(
                f"`data.mix` names source {name!r} (stage={cfg.stage_name}) but `data.sources` has no such entry; "
                f"sources defined by this data config: {sorted(sources)}"
            )
    _check_exact_mix_per_rank(cfg, plan, mode)
    strategy = cfg.hardware.get("strategy")
    check_compile(cfg.compile, deepspeed=not isinstance(strategy, str) and "config" in strategy)
    select_kernels(cfg.model.get("kernels", "auto"), _cuda_requested(cfg), liger_importable(), cfg.compile)
    warmup = cfg.scheduler.get("warmup_steps", 0)
    if warmup >= cfg.trainer.max_steps:
        raise ConfigError(
            f"`scheduler.warmup_steps`={warmup} must be smaller than `trainer.max_steps`={cfg.trainer.max_steps}"
        )
    return plan


def _command_line_overrides() -> list[str]:
    """The overrides of the running Hydra app (none outside one: the compose API in tests, a config built in code)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_mix_overrides(overrides: list[str]) -> None:
    """Refuse a ``data.mix`` source set twice on the command line (``data.mix.zh=3 ... data.mix.zh=5``,
    ``data.mix={zh: 1, zh: 2}``, ``data.mix.zh=1 data.mix={zh: 4}``).

    Only the overrides can show it: Hydra applies them in order and keeps the last value, and a config file with a
    duplicate key does not load at all (OmegaConf's YAML loader refuses it). Removing a source (``~data.mix.zh``) and
    setting it again is not a duplicate.

    Raises:
        ConfigError: naming ``data.mix.<source>`` and the overrides that set it.
    """
    setters: dict[str, list[str]] = {}
    for override in overrides:
        parsed = _override_keys(override)
        if parsed is None:
            continue  # not an assignment billa can read (Hydra reports bad syntax itself, before billa runs)
        deleted, keys = parsed
        if deleted:
            setters = {k: v for k, v in setters.items() if k != keys[0] and not k.startswith(keys[0] + ".")}
            continue
        for key in keys:
            if key.startswith("data.mix."):
                setters.setdefault(key, []).append(override)
    for key, lines in setters.items():
        if len(lines) > 1:
            shown = " ".join(dict.fromkeys(lines))
            raise ConfigError(
                f"`{key}` is set {len(lines)} times on the command line ({shown}); Hydra would keep the last value "
                "silently. Name each source of data.mix once"
            )


def _override_keys(override: str) -> tuple[bool, list[str]] | None:
    """(is a deletion, the full keys an override sets, once per time it names them), or None when it does not parse.

    A dict value sets each of its keys (``data.mix={zh: 1, zh: 2}`` sets ``data.mix.zh`` twice: Hydra's own parse
    keeps one, so the keys are read from the parse tree).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from hydra.grammar.gen.OverrideLexer import CommonTokenStream, InputStream, OverrideLexer
    from hydra.grammar.gen.OverrideParser import OverrideParser

    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException:
        return None
    key = parsed.key_or_group
    if parsed.type == OverrideType.DEL:
        return True, [key]
    tree = OverrideParser(CommonTokenStream(OverrideLexer(InputStream(override)))).override()
    value = tree.value()
    element = value.element() if value is not None else None
    container = element.dictContainer() if element is not None else None
    return False, _dict_keys(container, key) if container is not None else [key]


def _dict_keys(container, prefix: str) -> list[str]:
    """Full keys of a dict literal's entries (nested dicts: their entries), duplicates kept."""
    keys = []
    for pair in container.dictKeyValuePair():
        key = f"{prefix}.{pair.dictKey().getText()}"
        inner = pair.element().dictContainer()
        keys += _dict_keys(inner, key) if inner is not None else [key]
    return keys


def _cuda_requested(cfg: DictConfig) -> bool:
    """The run trains on CUDA devices: a GPU hardware config on a machine that has CUDA."""
    if cfg.hardware.accelerator == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def _check_exact_mix_per_rank(cfg: DictConfig, plan: BatchPlan, mode: str) -> None:
    """``data.exact_mix_per_rank``: every micro batch on every rank holds the exact mix (BiLLa: 20 per GPU = one
    20-sample stage-2 cycle, no accumulation). The stream is cut into contiguous micro batches, so this holds exactly
    when the micro batch is a multiple of the round-robin cycle (the sum of the ``data.mix`` weights)."""
    if not cfg.data.exact_mix_per_rank:
        return
    if mode != "round_robin":
        raise ConfigError(f"`data.exact_mix_per_rank`=true needs `data.mix_mode`=round_robin, got {mode!r}")
    cycle = sum(int(w) for w in cfg.data.mix.values())
    if plan.micro_size % cycle:
        raise ConfigError(
            f"`data.exact_mix_per_rank`=true needs `hardware.micro_batch_size`={plan.micro_size} to be a multiple of "
            f"the mix cycle {cycle} (sum of the `data.mix` weights, stage={cfg.stage_name}): set "
            f"hardware.micro_batch_size to {cycle} or {2 * cycle} (and batch.global_size to a multiple of it x "
            f"devices), or data.exact_mix_per_rank=false (then each global batch that is a multiple of {cycle} holds "
            "the exact mix, and a micro batch holds a contiguous part of it)"
        )


# ---- objects from config: a `_target_` partial completed with run-time values by parameter name ----------------


def accepted(fn: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that ``fn`` takes as parameters (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(values)
    return {name: value for name, value in values.items() if name in params}


def complete(node: Any, runtime: Mapping[str, Any], key: str = "", **config: Any) -> Any:
    """Instantiate the partial ``node`` (``_target_`` + ``_partial_: true``) and call it with run-time values.

    Args:
        node: a config node whose keys are parameters of its ``_target_``.
        runtime: values that exist only at run time (tokenizer, batch plan, sample counts); each is passed when the
            target has a parameter of that name, so a new option is one YAML key and one parameter, nothing between.
        key: the node's config key (``data``, ``module``), named in errors.
        **config: values that replace the node's own keys (e.g. a different ``mix`` for evaluation).

    Raises:
        ConfigError: a key of the node that its target has no parameter for (a typo, or an option of another version).
    """
    from hydra.utils import instantiate

    fn = instantiate(node, _convert_="all", **config)
    params = inspect.signature(fn.func).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(fn.keywords) - set(params))
        if unknown:
            target = f"{fn.func.__module__}.{fn.func.__qualname__}"
            options = ", ".join(name for name in params if name != "self")
            raise ConfigError(
                f"`{key or 'node'}.{unknown[0]}` is not an option of {target}; its options are: {options}"
            )
    return fn(**accepted(fn, runtime))
