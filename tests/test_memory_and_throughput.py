"""Memory plan arithmetic, the stop-before-OOM check, MFU's FLOP count, the SLURM launcher config."""

from __future__ import annotations

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from billa.callbacks import flops_per_token
from billa.config import ConfigError, plan_hardware
from billa.distributed.memory import GIB, plan_memory
from billa.train import check_memory

from .conftest import CONF
from .helpers import quiet_trainer, tiny_module

LLAMA_7B = {"hidden_size": 4096, "num_hidden_layers": 32}
N_7B = 6_860_828_672  # LLaMA-7B with BiLLa's 46,943-piece vocabulary (tests/test_configs.py)


def test_zero3_partitions_params_grads_and_optimizer_states():
    plan = plan_memory(
        N_7B,
        LLAMA_7B,
        46_943,
        micro_batch=2,
        seq_len=1024,
        world_size=8,
        precision="bf16-mixed",
        zero_stage=3,
        activation_checkpointing=True,
        capacity_gb=80,
    )
    assert plan.parameters == pytest.approx(2 * N_7B / 8)
    assert plan.gradients == pytest.approx(2 * N_7B / 8)
    assert plan.optimizer == pytest.approx(12 * N_7B / 8)
    # 16-bit layer inputs kept (32 x 2,048 tokens x 4,096 x 2 B), then the larger moment: the loss in one piece
    # (12 B per logit element: fp32 log-softmax, its gradient, the logits' gradient; + 10 h per token beside) or a
    # recomputed layer's backward (24 h + 8 i, + 6 i - 2 h); + 1e9 gathered 16-bit parameters (ZeRO-3's default)
    loss = 12 * 2048 * 46_943 + 10 * 4096 * 2048
    layer = (24 * 4096 + 8 * 11008 - 2 * 4096 + 6 * 11008) * 2048
    assert loss > layer
    assert plan.gathered == 2 * 10**9
    assert plan.activations == pytest.approx(32 * 2048 * 4096 * 2 + loss + 2 * 10**9)
    assert plan.step == pytest.approx(4 * N_7B / 8)  # the optimizer step's fp32 gradients of its sub group
    assert plan.fits and 18 * GIB < plan.total < 22 * GIB


def test_stages_and_offload():
    kwargs = dict(
        n_params=1000,
        architecture={"hidden_size": 8, "num_hidden_layers": 1},
        vocab_size=10,
        micro_batch=1,
        seq_len=1,
        world_size=4,
        precision="bf16-mixed",
    )
    z1, z2 = plan_memory(**kwargs, zero_stage=1), plan_memory(**kwargs, zero_stage=2)
    assert (z1.parameters, z1.gradients, z1.optimizer) == (2000, 2000, 3000)
    assert (z2.parameters, z2.gradients, z2.optimizer) == (2000, 500, 3000)
    off = plan_memory(**kwargs, zero_stage=3, offload_optimizer=True, offload_parameters=True)
    assert (off.parameters, off.optimizer, off.cpu_offloaded) == (0, 0, 3000 + 500)
    ddp = plan_memory(**kwargs)  # no DeepSpeed: fp32 weights + grads + Adam m, v
    assert (ddp.parameters, ddp.gradients, ddp.optimizer) == (4000, 4000, 8000)


def test_7b_on_one_a100_stops_with_a_clear_message(compose):
    cfg = compose(["model=llama-7b", "hardware=1xa100", "data=billa"])
    with pytest.raises(ConfigError, match=r"needs ~1\d\d\.\d GiB per device but hardware.gpu_memory_gb=80.*8xa100"):
        check_memory(cfg, plan_hardware(cfg), 46_943, cfg.data.max_seq_length)
    cfg = compose(["model=llama-7b", "hardware=8xa100", "data=billa", "model.vocab_size=46943"])
    check_memory(cfg, plan_hardware(cfg), 46_943, cfg.data.max_seq_length)  # fits


def test_memory_check_false_lets_a_plan_that_does_not_fit_start(compose, caplog):
    """README: ``memory_check=false`` overrides the stop; the plan is still computed and logged."""
    cfg = compose(["model=llama-7b", "hardware=1xa100", "data=billa", "memory_check=false"])
    with caplog.at_level("INFO", logger="billa"):
        check_memory(cfg, plan_hardware(cfg), 46_943, cfg.data.max_seq_length)  # no ConfigError
    assert "Memory plan: 6,860,828,672 parameters, no ZeRO over 1 ranks" in caplog.text


def test_offload_hardware_uses_deepspeed_cpu_adam(compose):
    node = plan_hardware(compose(["hardware=8xa100-offload", "data=billa"])).optimizer
    assert node["_target_"] == "deepspeed.ops.adam.DeepSpeedCPUAdam" and node["adamw_mode"] is True
    assert node["betas"] == [0.9, 0.95] and "fused" not in node
    assert "fused" not in plan_hardware(compose(["hardware=cpu", "hardware.precision=16-mixed"])).optimizer  # scaling
    assert plan_hardware(compose(["hardware=cpu"])).optimizer["fused"] is True


def test_flops_per_token():
    # 6N + 12 L h s (PaLM appendix B): LLaMA-7B at 1024 tokens
    assert flops_per_token(N_7B, 32, 4096, 1024) == 6 * N_7B + 12 * 32 * 4096 * 1024


def test_slurm_launcher_config_composes():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(
            "train", overrides=["hydra/launcher=billa_slurm", "hardware=2x8xa100"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)


def test_bf16_mixed_keeps_fused_adamw_and_billa_clips(compose, tmp_path):
    """bf16-mixed without DeepSpeed: fused AdamW stays, and BillaLM clips the gradient norm before the step.

    Catches dropping ``fused`` again under bf16 (the step benchmark's bf16 slowdown), handing the clip back to
    Lightning (which raises for a fused optimizer) and a module clip that is not applied.
    """
    import torch
    from torch.utils.data import DataLoader

    from billa.data.collate import PadCollator

    cfg = compose(["hardware=cpu", "hardware.precision=bf16-mixed", "optimizer.lr=1e-3"])
    node = plan_hardware(cfg).optimizer
    assert node["fused"] is True and plan_hardware(cfg).clips_in_module
    assert not plan_hardware(compose(["hardware=cpu"])).clips_in_module  # fp32: Lightning clips as before
    scheduler = {"_target_": "billa.model.schedule.cosine_with_warmup", "_partial_": True, "warmup_steps": 1}
    module = tiny_module(
        cfg.model.architecture,
        64,
        optimizer=node,
        scheduler=scheduler,
        configure=False,
        validate_at_start=False,
        clip_grad_norm=1e-3,
    )
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0)).tolist()
    items = [{"input_ids": row, "labels": row} for row in ids]
    trainer = quiet_trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=1, gradient_clip_val=None, default_root_dir=tmp_path
    )
    trainer.fit(module, DataLoader(items, batch_size=2, collate_fn=PadCollator(0)))
    assert trainer.optimizers[0].defaults["fused"] is True
    assert module._grad_norm > 1e-2  # the unclipped norm, logged as train/grad_norm
    clipped = torch.nn.utils.get_total_norm([p.grad for p in module.model.parameters() if p.grad is not None])
    assert float(clipped) == pytest.approx(1e-3, rel=1e-3)
