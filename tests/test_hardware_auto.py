"""``hardware.micro_batch_size=auto`` / ``hardware.activation_checkpointing=auto`` chosen from the memory plan, the
machine check that stops a hardware config this machine cannot run before any work, and the plan-vs-GPU-peak hook."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict

from billa.config import AUTO_MEMORY_FRACTION, ConfigError, plan_batch, plan_hardware, validate
from billa.distributed.machine import Machine, check_machine
from billa.distributed.memory import GIB, PeakMemoryCheck, compare_peak, plan_memory
from billa.train import check_memory

from .helpers import run_door
from .test_error_path import assert_billa_error

SEVEN_B = ["model=llama-7b", "data=billa", "model.vocab_size=46943"]  # BiLLa's 7B; no tokenizer needed to plan
N_7B = 6_860_828_672


def _plan_7b(micro: int, checkpointing: bool, capacity_gb: float, world: int = 8):
    """BiLLa's 7B under hardware=8xa100's ZeRO-3 block, at 1,024 tokens, with the model config's residual dropout."""
    arch = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}
    zero = {"stage": 3, "stage3_max_live_parameters": 1_000_000_000}
    return plan_memory(
        N_7B, arch, 46_943, micro, 1024, world, "bf16-mixed", 3, False, False, checkpointing, capacity_gb, 2048,
        0.05, zero,
    )  # fmt: skip


@pytest.mark.parametrize(
    "stage,micro,accumulation,larger", [("pretrain", 5, 4, 10), ("task_mix", 5, 4, 10), ("sft", 6, 1, None)]
)
def test_8xa100_auto_picks_the_largest_micro_batch_without_checkpointing_for_7b(
    compose, stage, micro, accumulation, larger
):
    """Bugs caught: auto taking the smallest micro batch (BiLLa's 7B at micro 2 wastes the 80 GB), turning
    checkpointing on when ZeRO-3's ~14 GB of states leave room without it, the global batch not kept (accumulation
    not derived from the choice), ``auto`` left in the config for the data module / DeepSpeed / model card, or a
    plan that under-counts LLaMA's layers (GPT's 34 h per layer and per token planned micro 10 at 60 GiB; LLaMA's
    layers at micro 10 need ~81 GiB of the 72 usable: an OOM on the A100s)."""
    cfg = compose([f"stage={stage}", "hardware=8xa100", *SEVEN_B])
    assert cfg.hardware.micro_batch_size == "auto" and cfg.hardware.activation_checkpointing == "auto"
    plan = validate(cfg)
    assert (plan.micro_size, plan.accumulation) == (micro, accumulation)
    assert plan.micro_size * 8 * plan.accumulation == cfg.batch.global_size  # 160 or 48, kept
    assert cfg.hardware.micro_batch_size == micro and cfg.hardware.activation_checkpointing is False  # resolved once
    assert plan.auto.planned <= AUTO_MEMORY_FRACTION * 80 * GIB  # the next divisor of the share does not fit:
    assert larger is None or _plan_7b(larger, False, 80).total > AUTO_MEMORY_FRACTION * 80 * GIB  # sft: 6 is all
    assert plan_hardware(cfg, plan).deepspeed["train_micro_batch_size_per_gpu"] == micro
    assert plan_batch(cfg) == plan  # the same on every later call (every rank, resume)
    assert str(plan.auto).startswith(f"micro batch auto -> {micro}, activation checkpointing auto -> off (plan: ")


def test_auto_turns_checkpointing_on_only_when_no_micro_batch_fits_without_it(compose):
    """Bug caught: checkpointing chosen by micro batch size instead of by need (on although micro 1 fits without
    it, or off with a micro batch that does not fit), or the largest fitting micro batch not taken."""
    cfg = compose(["stage=pretrain", "hardware=8xa100", "hardware.gpu_memory_gb=23", *SEVEN_B])
    plan = validate(cfg)
    usable = AUTO_MEMORY_FRACTION * 23 * GIB
    assert _plan_7b(1, False, 23).total > usable  # nothing fits without checkpointing ...
    assert plan.auto.activation_checkpointing is True and cfg.hardware.activation_checkpointing is True
    assert (plan.micro_size, plan.accumulation) == (5, 4)  # 20 per GPU: divisors 20, 10, 5, ... -> 5 x 8 x 4 = 160
    assert _plan_7b(5, True, 23).total <= usable < _plan_7b(10, True, 23).total
    fixed = compose(["stage=pretrain", "hardware=8xa100", "hardware.activation_checkpointing=false", *SEVEN_B])
    assert validate(fixed).micro_size == 5 and fixed.hardware.activation_checkpointing is False  # only micro auto


def test_exact_mix_per_rank_auto_finds_billas_20_per_gpu_with_checkpointing(compose):
    """Bug caught: auto ignoring ``data.exact_mix_per_rank`` (a micro batch of 10 that validate then refuses);
    BiLLa's stage 2 ran exactly this: 20 per GPU, one mix cycle, gradient checkpointing, no accumulation."""
    cfg = compose(["stage=task_mix", "hardware=8xa100", "data.exact_mix_per_rank=true", *SEVEN_B])
    plan = validate(cfg)
    assert (plan.micro_size, plan.accumulation, cfg.hardware.activation_checkpointing) == (20, 1, True)


def test_auto_errors_name_the_keys(compose):
    """Bugs caught: a 7B on one GPU passing auto with a plan that cannot fit (it would OOM after tokenising), auto
    with no device memory to plan for guessing silently, a global batch that cannot divide, a typo'd value."""
    with pytest.raises(ConfigError, match=r"needs ~\d+\.\d GiB per device even at micro batch 1 with activation "
                       r"checkpointing on.*hardware.gpu_memory_gb=80.*8xa100-offload"):  # fmt: skip
        validate(compose(["hardware=1xa100", "hardware.micro_batch_size=auto", *SEVEN_B]))
    loose = compose(["hardware=1xa100", "hardware.micro_batch_size=auto", "memory_check=false", *SEVEN_B])
    assert validate(loose).micro_size == 1  # memory_check=false: the smallest plan is tried
    with pytest.raises(ConfigError, match=r"hardware.micro_batch_size`=auto.*hardware.gpu_memory_gb, which is null"):
        validate(compose(["hardware=cpu_zero3", "hardware.micro_batch_size=auto"]))
    cpu = compose(["hardware=cpu_zero3", "hardware.activation_checkpointing=auto"])
    assert validate(cpu).micro_size == 8 and cpu.hardware.activation_checkpointing is False  # nothing to fit: off
    with pytest.raises(ConfigError, match=r"batch.global_size=100 does not divide over hardware.devices=8"):
        plan_batch(compose(["hardware=8xa100", "batch.global_size=100", *SEVEN_B]))
    with pytest.raises(ConfigError, match=r"hardware.activation_checkpointing`='maybe': expected true, false or auto"):
        plan_batch(compose(["hardware.activation_checkpointing=maybe"]))
    with pytest.raises(ConfigError, match=r"hardware.micro_batch_size` must be a positive integer or auto"):
        plan_batch(compose(["hardware.micro_batch_size=big"]))


def test_the_choice_is_printed_with_the_memory_plan(compose, caplog):
    """Bug caught: auto choosing silently (the log shows a plan but not that auto picked micro 5, checkpointing
    off, nor how much of the device it uses)."""
    cfg = compose(["stage=pretrain", "hardware=8xa100", *SEVEN_B])
    hardware = plan_hardware(cfg, validate(cfg))
    with caplog.at_level("INFO", logger="billa"):
        check_memory(cfg, hardware, 46_943, cfg.data.max_seq_length)
    assert "total per device" in caplog.text
    assert "micro batch auto -> 5, activation checkpointing auto -> off (plan: 49.6 GiB of 72.0 GiB" in caplog.text
    assert "ZeRO-3 gathered" in caplog.text  # the parameters ZeRO-3 holds whole, a row of the printed plan


# ---- the machine check ------------------------------------------------------------------------------------------
def test_machine_check_names_what_the_machine_has_and_the_fix(compose):
    """Bugs caught: a GPU config accepted on a machine with no GPU, fewer GPUs, or no bf16 (each fails later, deep in
    Lightning or NCCL, after tokenising); a CPU config refused; flash-attention requested but not installed."""
    cfg = compose(["hardware=8xa100"])
    if not torch.cuda.is_available():  # this machine, as detected
        with pytest.raises(ConfigError, match=r"conf/hardware/8xa100.yaml trains on GPUs.*no CUDA device.*cpu_zero3"):
            check_machine(cfg, choice="8xa100")
    check_machine(compose(["hardware=cpu_zero3"]))  # runs anywhere
    two = Machine(gpus=["NVIDIA A100-SXM4-80GB"] * 2, bf16=True, flash_attn=True, torch_cuda="12.4")
    with pytest.raises(ConfigError, match=r"hardware.devices=8 GPUs per node, but this machine has 2 \(NVIDIA A100.*"
                       r"Set hardware.devices=2"):  # fmt: skip
        check_machine(cfg, two, "8xa100")
    check_machine(compose(["hardware=8xa100", "hardware.devices=2"]), two, "8xa100")
    v100 = Machine(gpus=["Tesla V100-SXM2-32GB"] * 8, bf16=False, torch_cuda="12.4")
    with pytest.raises(ConfigError, match=r"precision=bf16-mixed, but this machine's GPU \(Tesla V100-SXM2-32GB\) "
                       r"has no bf16.*16-mixed and hardware.strategy.config.bf16.enabled=false"):  # fmt: skip
        check_machine(cfg, v100, "8xa100")
    flash = compose(["hardware=8xa100"])
    with open_dict(flash):
        flash.model.attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match=r"model.attn_implementation`=flash_attention_2.*flash_attn.*sdpa"):
        check_machine(flash, Machine(gpus=["NVIDIA H100"] * 8, bf16=True, torch_cuda="12.4"), "8xa100")


def test_gpu_config_on_a_cpu_machine_stops_before_any_work(tmp_path, cache_dir):
    """Bug caught: ``python train.py stage=sft hardware=8xa100`` on a CPU machine tokenising, printing the memory
    plan and opening a W&B run before failing inside Lightning ("No supported gpu backend found!")."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    tokens, run = tmp_path / "tokens", tmp_path / "run"
    result = run_door(
        "train.py", "stage=sft", "hardware=8xa100", f"hydra.run.dir={run}", f"data.token_cache_dir={tokens}",
        env={"BILLA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline"}, timeout=300,
    )  # fmt: skip
    assert_billa_error(result, run / "train.log", "conf/hardware/8xa100.yaml", "no CUDA device", "hardware=cpu_zero3")
    assert not tokens.exists() and not (run / "wandb").exists() and "Memory plan" not in result.stderr


def test_pipeline_checks_the_machine_before_its_vocabulary_step(compose, tmp_path):
    """Bug caught: ``pipeline=billa hardware=8xa100`` on a CPU machine expanding the vocabulary (or creating its stage
    store) before the first stage fails."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from billa.pipeline import run_pipeline

    cfg = compose(["pipeline=billa", "hardware=8xa100", f"pipeline.store_dir={tmp_path / 'stages'}"], tmp_path)
    with pytest.raises(ConfigError, match="no CUDA device"):
        run_pipeline(cfg, ["hardware=8xa100"])
    assert not (tmp_path / "stages").exists()


# ---- plan vs measured GPU peak ----------------------------------------------------------------------------------
def test_peak_comparison_after_step_two(tmp_path):
    """Bugs caught: the comparison counting the runtime overhead the allocator never sees, measuring before the
    optimizer states exist (step 1), measuring on a CPU, or logging only on one path; the GPU check reads this."""
    plan = _plan_7b(10, False, 80)
    predicted = plan.total - plan.overhead
    result = compare_peak(plan, 1.05 * predicted)
    assert result["memory/peak_over_plan"] == pytest.approx(1.05)
    assert result["memory/plan_gib"] == pytest.approx(predicted / GIB) and "+5.0%: within" in result["message"]
    assert "outside" in compare_peak(plan, 1.2 * predicted)["message"]

    seen = []
    check = PeakMemoryCheck(plan, str(tmp_path), measure=lambda device: seen.append(device) or 0.9 * predicted)
    module = SimpleNamespace(device=torch.device("cpu"))
    for step in (1, 2, 2, 3):
        check.on_train_batch_end(
            SimpleNamespace(global_step=step, is_global_zero=True, loggers=[]), module, None, {}, 0
        )
    assert len(seen) == 1  # once, at the first micro batch after optimizer step 2
    assert json.loads((tmp_path / "memory_check.json").read_text())["memory/peak_over_plan"] == pytest.approx(0.9)
    on_cpu = PeakMemoryCheck(plan)  # the default measure: CUDA only
    on_cpu.on_train_batch_end(SimpleNamespace(global_step=2, is_global_zero=True, loggers=[]), module, None, {}, 0)
    assert on_cpu.result is None
