"""``run(cfg)``: build data, module, strategy and trainer from the composed config; fit; export a HF directory."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from billa.callbacks import PartitionReport, StepCheckpoint, StopAtStep, Throughput, flops_per_token
from billa.config import BatchPlan, ConfigError, validate
from billa.data.datamodule import BillaDataModule
from billa.distributed.checkpoints import resolve_ckpt_path
from billa.distributed.memory import plan_memory, zero_settings
from billa.export import gather_state_dict, save_hf_model
from billa.model.builders import count_parameters
from billa.model.module import BillaLM
from billa.tokenizer.load import load_tokenizer
from billa.utils.logging import get_logger, setup_logging
from billa.utils.secrets import redact

log = get_logger(__name__)


def build_datamodule(cfg: DictConfig, plan: BatchPlan, tokenizer_dir: str) -> BillaDataModule:
    data = cfg.data
    build = instantiate(data.build, _partial_=True) if data.get("build") else None
    return BillaDataModule(
        sources=OmegaConf.to_container(data.sources, resolve=True),
        mix=OmegaConf.to_container(data.mix),
        objectives=OmegaConf.to_container(data.objectives),
        tokenizer_dir=tokenizer_dir,
        max_seq_length=data.max_seq_length,
        micro_batch_size=plan.micro_size,
        global_batch_size=plan.global_size,
        num_samples=cfg.trainer.max_steps * plan.global_size,
        seed=cfg.seed,
        val_max_records=data.get("val_max_records", 1000),
        build=build,
        prompts_dir=data.get("prompts_dir"),
        translation_extra_newline=data.get("translation_extra_newline", False),
        num_workers=cfg.hardware.num_workers,
        on_error=data.get("on_error", "raise"),
        token_cache_dir=data.get("token_cache_dir"),
        num_proc=data.get("num_proc", 1),
        layout=data.get("layout", "pad"),
        mix_mode=data.get("mix_mode", "round_robin"),
    )


def strategy_config(cfg: DictConfig) -> dict | None:
    """The DeepSpeed config of the hardware's strategy (None for ``auto``/DDP)."""
    strategy = cfg.hardware.strategy
    if isinstance(strategy, str) or "config" not in strategy:
        return None
    return OmegaConf.to_container(strategy.config, resolve=True)


def build_strategy(cfg: DictConfig, plan: BatchPlan):
    """The hardware's strategy: a string (``auto``, ``ddp``) or an object node; DeepSpeed gets the micro batch."""
    strategy = cfg.hardware.strategy
    if isinstance(strategy, str):
        return strategy
    node = OmegaConf.to_container(strategy, resolve=True)
    if "config" in node:
        node["config"]["train_micro_batch_size_per_gpu"] = plan.micro_size
    return instantiate(node, _convert_="all")


def clips_in_module(cfg: DictConfig) -> bool:
    """True where BillaLM clips gradients itself: bf16-mixed without DeepSpeed and a fused optimizer.

    Lightning's mixed-precision plugin refuses ``gradient_clip_val`` with an optimizer that unscales gradients inside
    its step (fused AdamW) — a rule for fp16 loss scaling; bf16 has no loss scale, so clipping before the step is
    exact and the fused kernel can stay.
    """
    precision = str(cfg.hardware.precision)
    fused = bool(cfg.optimizer.get("fused", False))
    return strategy_config(cfg) is None and precision.startswith("bf16") and "mixed" in precision and fused


def optimizer_config(cfg: DictConfig) -> dict:
    """The optimizer node, adapted to the strategy and precision where a library requires it.

    - ZeRO optimizer offload: torch AdamW becomes DeepSpeed's CPU Adam with the same hyperparameters (DeepSpeed
      refuses a torch optimizer when optimizer states live on the CPU; its AVX Adam is also faster there).
    - fp16 mixed precision without DeepSpeed: Lightning's loss scaler cannot unscale before a fused optimizer's
      step, so ``fused`` is dropped there. bf16-mixed keeps it (BillaLM clips, see ``clips_in_module``).
    """
    node = OmegaConf.to_container(cfg.optimizer, resolve=True)
    ds_config = strategy_config(cfg)
    _, offload_optimizer, _ = zero_settings(ds_config)
    if offload_optimizer and node["_target_"] == "torch.optim.AdamW":
        node = {**node, "_target_": "deepspeed.ops.adam.DeepSpeedCPUAdam", "adamw_mode": True}
        node.pop("fused", None)
        log.info("ZeRO optimizer offload: using deepspeed.ops.adam.DeepSpeedCPUAdam (AdamW mode)")
    elif ds_config is None and "mixed" in str(cfg.hardware.precision) and not clips_in_module(cfg):
        if node.pop("fused", None):
            log.info("%s precision without DeepSpeed: fused AdamW off (loss scaling)", cfg.hardware.precision)
    return node


def check_memory(cfg: DictConfig, plan: BatchPlan, vocab_size: int) -> None:
    """Print the per-device memory plan; stop before training when it cannot fit (``memory_check: false`` skips)."""
    hw = cfg.hardware
    n_params = count_parameters(cfg.model.architecture, vocab_size)
    stage, offload_optimizer, offload_parameters = zero_settings(strategy_config(cfg))
    memory = plan_memory(
        n_params,
        cfg.model.architecture,
        vocab_size,
        plan.micro_size,
        cfg.data.max_seq_length,
        plan.world_size,
        str(hw.precision),
        stage,
        offload_optimizer,
        offload_parameters,
        hw.activation_checkpointing,
        hw.get("gpu_memory_gb"),
    )
    zero = "no ZeRO" if stage is None else f"ZeRO stage {stage}"
    log.info(
        "Memory plan: %s parameters, %s over %d ranks:\n%s", f"{n_params:,}", zero, plan.world_size, memory.table()
    )
    if not memory.fits and cfg.get("memory_check", True):
        raise ConfigError(
            f"model={cfg.model.name} with this hardware config needs ~{memory.total / 2**30:.1f} GiB per "
            f"device but hardware.gpu_memory_gb={hw.gpu_memory_gb}. Lower hardware.micro_batch_size (now "
            f"{plan.micro_size}), enable hardware.activation_checkpointing, use more devices or a ZeRO offload "
            "hardware config (hardware=8xa100-offload); set memory_check=false to try anyway."
        )


def build_logger(cfg: DictConfig):
    if not cfg.get("logger"):
        return False
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))  # no API key ever reaches W&B
    return logger


def build_trainer(cfg: DictConfig, plan: BatchPlan, vocab_size: int) -> L.Trainer:
    hw = cfg.hardware
    logger = build_logger(cfg)
    arch = cfg.model.architecture
    n_params = count_parameters(arch, vocab_size)
    fpt = flops_per_token(n_params, arch.num_hidden_layers, arch.hidden_size, cfg.data.max_seq_length)
    callbacks = [
        Throughput(cfg.trainer.log_every_n_steps, fpt, hw.get("peak_tflops")),
        PartitionReport(str(Path(cfg.output_dir) / "partition")),
        StepCheckpoint(
            dirpath=Path(cfg.output_dir) / "checkpoints",
            filename="step={step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.checkpoint.every_n_steps,
            save_top_k=cfg.checkpoint.keep_last,  # the last K by step
            monitor="step",
            mode="max",
            save_last="link",
            save_on_train_epoch_end=False,
        ),
    ]
    if cfg.get("stop_after_steps"):
        callbacks.append(StopAtStep(cfg.stop_after_steps))
    return instantiate(
        cfg.trainer,
        accelerator=hw.accelerator,
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        precision=hw.precision,
        strategy=build_strategy(cfg, plan),
        accumulate_grad_batches=plan.accumulation,
        gradient_clip_val=None if clips_in_module(cfg) else cfg.trainer.gradient_clip_val,  # else BillaLM clips
        val_check_interval=cfg.val_every_n_steps * plan.accumulation,  # Lightning counts micro batches
        check_val_every_n_epoch=None,
        use_distributed_sampler=False,  # BillaDataModule shards the stream itself (exact resume)
        logger=logger,
        callbacks=callbacks,
        default_root_dir=cfg.output_dir,
    )


@torch.no_grad()
def probe_logits(module: BillaLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the trained model on ``batch`` (a collective forward under ZeRO-3: call on every rank)."""
    was_training = module.model.training
    module.model.eval()
    out = module.model(
        input_ids=batch["input_ids"].to(module.device), attention_mask=batch["attention_mask"].to(module.device)
    )
    module.model.train(was_training)
    return out.logits.float().cpu()


def export(cfg: DictConfig, trainer: L.Trainer, module: BillaLM, tokenizer_dir: str, probe: dict | None) -> dict:
    """Gather (ZeRO-3: per parameter) and write the HF directory on rank 0; optionally check it against the model."""
    state = gather_state_dict(module.model, trainer.is_global_zero)
    trained_logits = probe_logits(module, probe) if probe is not None and cfg.export.verify else None
    result = {"export_dir": str(cfg.export.dir)}
    if trainer.is_global_zero:
        save_hf_model(module.model, tokenizer_dir, cfg.export.dir, state, cfg.export.max_shard_size)
        if trained_logits is not None:
            from transformers import AutoModelForCausalLM

            exported = AutoModelForCausalLM.from_pretrained(cfg.export.dir, dtype=torch.float32)
            with torch.no_grad():
                logits = exported(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
            mask = probe["attention_mask"].bool()
            diff = (logits[mask] - trained_logits[mask]).abs().max().item()
            result["export_max_abs_logit_diff"] = diff
            log.info("Export check: max |logit(export) - logit(trained)| = %.3g on %d tokens", diff, int(mask.sum()))
        Path(cfg.output_dir, "export_check.json").write_text(json.dumps(result, indent=1))
    trainer.strategy.barrier()
    return result


def report_data(stats: dict) -> None:
    """End-of-run data report: records read, examples used, and every record not used and why."""
    for split, counts in sorted(stats.items()):
        dropped = {k: counts.get(k, 0) for k in ("filtered", "skipped_malformed", "no_target_after_truncation")}
        line = f"{split}: {counts.get('records', 0)} records -> {counts.get('examples', 0)} examples"
        if any(dropped.values()):
            log.warning("Data report %s; not used: %s %s", line, dropped, counts.get("skipped_examples", [])[:3])
        else:
            log.info("Data report %s", line)


def run(cfg: DictConfig) -> dict:
    """Train one stage as configured and export the result.

    Returns:
        ``export_dir``, ``val_loss_start``, ``val_loss`` (last validation), ``train_loss``, ``global_step``,
        ``resumed_from`` and, with ``export.verify``, ``export_max_abs_logit_diff``.
    """
    setup_logging()
    plan = validate(cfg)
    log.info("Stage %s, model %s, %s", cfg.stage_name, cfg.model.name, plan)
    L.seed_everything(cfg.seed, workers=True)

    tokenizer_dir = instantiate(cfg.model.tokenizer)
    vocab_size = len(load_tokenizer(tokenizer_dir))
    datamodule = build_datamodule(cfg, plan, tokenizer_dir)
    if cfg.get("prepare_only"):  # tokenise every source into the cache and stop (e.g. on a CPU node before a GPU job)
        datamodule.prepare_data()
        report_data(datamodule.stats)
        return {"data": datamodule.stats, "token_cache_dir": datamodule.token_cache_dir}
    check_memory(cfg, plan, vocab_size)
    module = BillaLM(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        vocab_size=vocab_size,
        optimizer=optimizer_config(cfg),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        total_steps=cfg.trainer.max_steps,
        init_from=cfg.get("init_from"),
        gradient_checkpointing=cfg.hardware.activation_checkpointing,
        validate_at_start=cfg.validate_at_start,
        tokenizer_dir=tokenizer_dir,
        loss_chunk_tokens=cfg.get("loss_chunk_tokens", 2048),
        clip_grad_norm=cfg.trainer.gradient_clip_val if clips_in_module(cfg) else None,
    )
    trainer = build_trainer(cfg, plan, vocab_size)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("resume"), Path(cfg.output_dir) / "checkpoints")
    if ckpt_path:
        log.info("Resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    probe = next(iter(datamodule.val_dataloader()), None) if datamodule.val_set else None
    result = export(cfg, trainer, module, tokenizer_dir, probe)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    report_data(datamodule.stats)
    return {
        "data": datamodule.stats,
        **result,
        "val_loss_start": module.val_loss_start,
        "val_loss": metrics.get("val/loss"),
        "train_loss": metrics.get("train/loss"),
        "global_step": trainer.global_step,
        "resumed_from": ckpt_path,
        "metrics": metrics,
    }
