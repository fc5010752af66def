"""``run(cfg)``: build data, module, strategy and trainer from the composed config; fit; export a HF directory."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from billa.callbacks import Throughput
from billa.config import BatchPlan, validate
from billa.data.datamodule import BillaDataModule
from billa.export import save_hf_model
from billa.model.module import BillaLM
from billa.tokenizer.load import load_tokenizer
from billa.utils.logging import get_logger, setup_logging

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
        num_samples=cfg.trainer.max_steps * plan.global_size,
        seed=cfg.seed,
        val_max_records=data.get("val_max_records", 1000),
        build=build,
        prompts_dir=data.get("prompts_dir"),
        translation_extra_newline=data.get("translation_extra_newline", False),
        num_workers=cfg.hardware.num_workers,
    )


def build_strategy(cfg: DictConfig, plan: BatchPlan):
    """The hardware's strategy: a string (``auto``, ``ddp``) or an object node; DeepSpeed gets the micro batch."""
    strategy = cfg.hardware.strategy
    if isinstance(strategy, str):
        return strategy
    node = OmegaConf.to_container(strategy, resolve=True)
    if "config" in node:
        node["config"]["train_micro_batch_size_per_gpu"] = plan.micro_size
    return instantiate(node, _convert_="all")


def build_logger(cfg: DictConfig):
    if not cfg.get("logger"):
        return False
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def build_trainer(cfg: DictConfig, plan: BatchPlan) -> L.Trainer:
    hw = cfg.hardware
    logger = build_logger(cfg)
    callbacks = [
        Throughput(cfg.trainer.log_every_n_steps),
        ModelCheckpoint(
            dirpath=Path(cfg.output_dir) / "checkpoints",
            every_n_train_steps=cfg.get("checkpoint_every_n_steps") or cfg.val_every_n_steps,
            save_last=True,
            save_top_k=1,
            monitor="step",
            mode="max",
        ),
    ]
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return instantiate(
        cfg.trainer,
        accelerator=hw.accelerator,
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        precision=hw.precision,
        strategy=build_strategy(cfg, plan),
        accumulate_grad_batches=plan.accumulation,
        val_check_interval=cfg.val_every_n_steps * plan.accumulation,  # Lightning counts micro batches
        check_val_every_n_epoch=None,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=cfg.output_dir,
    )


def run(cfg: DictConfig) -> dict:
    """Train one stage as configured and export the result.

    Returns:
        ``export_dir``, ``val_loss_start``, ``val_loss`` (last validation), ``train_loss`` and ``global_step``.
    """
    setup_logging()
    plan = validate(cfg)
    log.info("Stage %s, model %s, %s", cfg.stage_name, cfg.model.name, plan)
    L.seed_everything(cfg.seed, workers=True)

    tokenizer_dir = instantiate(cfg.model.tokenizer)
    vocab_size = len(load_tokenizer(tokenizer_dir))
    datamodule = build_datamodule(cfg, plan, tokenizer_dir)
    module = BillaLM(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        vocab_size=vocab_size,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        total_steps=cfg.trainer.max_steps,
        init_from=cfg.get("init_from"),
        gradient_checkpointing=cfg.hardware.activation_checkpointing,
        validate_at_start=cfg.validate_at_start,
    )
    trainer = build_trainer(cfg, plan)
    trainer.fit(module, datamodule=datamodule)

    export_dir = None
    if trainer.is_global_zero:
        export_dir = save_hf_model(module.model, tokenizer_dir, cfg.export_dir)
    trainer.strategy.barrier()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {
        "export_dir": export_dir or str(cfg.export_dir),
        "val_loss_start": module.val_loss_start,
        "val_loss": metrics.get("val/loss"),
        "train_loss": metrics.get("train/loss"),
        "global_step": trainer.global_step,
        "metrics": metrics,
    }
