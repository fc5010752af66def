"""``run(cfg)``: one stage. Data module and LightningModule from their config partials, strategy and trainer from the
hardware plan; fit; export a Hugging Face directory. The pipeline (``billa.pipeline``) runs above this, never inside."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from billa.callbacks import (
    PartitionReport,
    RedactCheckpointHparams,
    StepCheckpoint,
    StepTimes,
    StopAtStep,
    Throughput,
    flops_per_token,
)
from billa.config import ConfigError, HardwarePlan, complete, memory_plan, plan_hardware, validate
from billa.data.datamodule import BillaDataModule
from billa.data.stream import STATE_FILE
from billa.distributed.checkpoints import AtomicCheckpointIO, resolve_ckpt_path
from billa.distributed.machine import check_machine
from billa.distributed.memory import MemoryPlan, PeakMemoryCheck
from billa.distributed.reshard import check_resumable
from billa.distributed.safe_load import check_checkpoint, weights_only_loading
from billa.export import gather_state_dict, save_hf_model
from billa.model.builders import count_parameters
from billa.model.module import BillaLM
from billa.model_card import ModelCard, hub_datasets, hydra_choice, hydra_command, realised_mix
from billa.progress import progress_callbacks
from billa.tokenizer.load import load_tokenizer
from billa.utils.logging import get_logger, setup_logging
from billa.utils.secrets import redact, redact_hydra_files

log = get_logger(__name__)


def run_time_values(cfg: DictConfig, hardware: HardwarePlan, tokenizer_dir: str | None, vocab_size: int | None) -> dict:
    """What the ``data:`` and ``module:`` partials are completed with: values that exist only at run time or come
    from other groups. Each target takes the ones it has a parameter for (``billa.config.complete``)."""
    batch = hardware.batch
    return {
        "tokenizer_dir": tokenizer_dir,
        "vocab_size": vocab_size,
        "micro_batch_size": batch.micro_size,
        "global_batch_size": batch.global_size,
        "num_samples": cfg.trainer.max_steps * batch.global_size,  # the training stream's length
        "total_steps": cfg.trainer.max_steps,  # the schedule's length
        "seed": cfg.seed,
        "num_workers": cfg.hardware.num_workers,
        "gradient_checkpointing": cfg.hardware.activation_checkpointing,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "init_from": cfg.get("init_from"),
        "optimizer": hardware.optimizer,
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
        "clip_grad_norm": cfg.trainer.gradient_clip_val if hardware.clips_in_module else None,
        **loss_grouping(cfg.get("loss") or {}, batch.global_size, batch.world_size),
    }


def loss_grouping(loss_cfg, global_size: int, world_size: int) -> dict:
    """``loss_group_size`` (for the data) and ``loss_groups`` (for the module) of ``loss.normalization``.

    ``rank_token_mean`` groups each step's samples in blocks of ``loss.rank_batch_size`` (null: global batch /
    devices, each device's share as in BiLLa); ``step_token_mean`` has one group, the whole step.

    Raises:
        ConfigError: ``loss.rank_batch_size`` is not a positive integer dividing ``batch.global_size``.
    """
    if loss_cfg.get("normalization", "step_token_mean") != "rank_token_mean":
        return {"loss_group_size": None, "loss_groups": 1}
    size = loss_cfg.get("rank_batch_size") or global_size // world_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or global_size % size:
        raise ConfigError(
            f"`loss.rank_batch_size`={size!r} must be a positive integer that divides batch.global_size={global_size}"
            " (or null: the global batch / devices)"
        )
    return {"loss_group_size": size, "loss_groups": global_size // size}


def stage_datamodule(cfg: DictConfig, tokenizer_dir: str) -> BillaDataModule:
    """The stage's data module exactly as ``run`` builds it (the mask inspector and tests use it)."""
    return complete(
        cfg.data, key="data", runtime=run_time_values(cfg, plan_hardware(cfg, validate(cfg)), tokenizer_dir, None)
    )


def embedding_rows(model_cfg: DictConfig, tokenizer_pieces: int) -> int:
    """Rows of the embedding and lm_head: ``model.vocab_size``, or the tokenizer's size when that is null.

    A larger ``model.vocab_size`` pads the vocabulary with rows no token id reaches (as vocabularies padded to a
    multiple of 64 are); ``+experiment=rehearsal`` keeps BiLLa's 46,943 rows with a 3,486-piece tokenizer that way.

    Raises:
        ConfigError: ``model.vocab_size`` is smaller than the tokenizer (token ids would index past the embedding).
    """
    rows = model_cfg.get("vocab_size")
    if rows is None:
        return tokenizer_pieces
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < tokenizer_pieces:
        raise ConfigError(
            f"`model.vocab_size`={rows!r} must be an integer of at least the tokenizer's {tokenizer_pieces:,} pieces "
            "(or null: the tokenizer's size)"
        )
    return rows


def build_strategy(hardware_cfg: DictConfig, hardware: HardwarePlan):
    """The hardware's strategy: a string (``auto``, ``ddp``) or an object node; DeepSpeed gets the plan's config."""
    strategy = hardware_cfg.strategy
    if isinstance(strategy, str):
        return strategy
    node = OmegaConf.to_container(strategy, resolve=True)
    if hardware.deepspeed is not None:
        node["config"] = hardware.deepspeed
    return instantiate(node, _convert_="all")


def check_memory(cfg: DictConfig, hardware: HardwarePlan, vocab_size: int, max_seq_length: int) -> MemoryPlan:
    """Print the per-device memory plan (and what ``auto`` chose from it); stop before training when it cannot fit
    (``memory_check: false`` skips the stop). Returns the plan."""
    hw, batch = cfg.hardware, hardware.batch
    n_params = count_parameters(cfg.model.architecture, vocab_size)
    memory = memory_plan(cfg, batch, vocab_size, max_seq_length)
    zero = "no ZeRO" if hardware.zero_stage is None else f"ZeRO stage {hardware.zero_stage}"
    chosen = f"\n  {batch.auto}" if batch.auto else ""
    log.info(
        "Memory plan: %s parameters, %s over %d ranks:\n%s%s",
        f"{n_params:,}",
        zero,
        batch.world_size,
        memory.table(),
        chosen,
    )
    if not memory.fits and cfg.get("memory_check", True):
        raise ConfigError(
            f"model={cfg.model.name} with this hardware config needs ~{memory.total / 2**30:.1f} GiB per "
            f"device but hardware.gpu_memory_gb={hw.gpu_memory_gb}. Lower hardware.micro_batch_size (now "
            f"{batch.micro_size}), enable hardware.activation_checkpointing, use more devices or a ZeRO offload "
            "hardware config (hardware=8xa100-offload); set memory_check=false to try anyway."
        )
    return memory


def build_logger(cfg: DictConfig):
    """The ``logger:`` group's logger; ``logger=none`` still writes ``<output_dir>/csv/version_N/metrics.csv``.

    Every figure a run logs is then in the run directory with or without an experiment tracker.
    """
    if not cfg.get("logger"):
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=cfg.output_dir, name="csv")  # the file logger=csv writes, nothing else
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))  # no API key ever reaches W&B
    return logger


def build_trainer(
    cfg: DictConfig, hardware: HardwarePlan, vocab_size: int, max_seq_length: int, memory: MemoryPlan | None = None
) -> L.Trainer:
    """The Lightning trainer of the hardware plan; ``memory``: compare it with the GPU's peak after step 2."""
    hw, batch = cfg.hardware, hardware.batch
    logger = build_logger(cfg)
    arch = cfg.model.architecture
    n_params = count_parameters(arch, vocab_size)
    fpt = flops_per_token(n_params, arch.num_hidden_layers, arch.hidden_size, max_seq_length)
    callbacks = [
        Throughput(cfg.trainer.log_every_n_steps, fpt, hw.get("peak_tflops")),
        StepTimes(cfg.trainer.log_every_n_steps),
        PartitionReport(str(Path(cfg.output_dir) / "partition")),
        RedactCheckpointHparams(),
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
    if memory is not None:
        callbacks.append(PeakMemoryCheck(memory, cfg.output_dir))  # on a CUDA device only
    progress, enable_progress_bar = progress_callbacks(
        cfg.progress, cfg.trainer.log_every_n_steps, cfg.trainer.enable_progress_bar, cfg.stage_name
    )
    callbacks += progress
    return instantiate(
        cfg.trainer,
        accelerator=hw.accelerator,
        devices=hw.devices,
        num_nodes=hw.num_nodes,
        precision=hw.precision,
        strategy=build_strategy(hw, hardware),
        plugins=[AtomicCheckpointIO()],  # single-file checkpoints written in place, renamed when whole
        accumulate_grad_batches=batch.accumulation,
        gradient_clip_val=None if hardware.clips_in_module else cfg.trainer.gradient_clip_val,  # else BillaLM clips
        val_check_interval=cfg.val_every_n_steps * batch.accumulation,  # Lightning counts micro batches
        check_val_every_n_epoch=None,
        use_distributed_sampler=False,  # BillaDataModule shards the stream itself (exact resume)
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=enable_progress_bar,  # a step bar on a terminal, text lines in job logs (billa.progress)
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


def model_card(cfg: DictConfig, hardware: HardwarePlan, trainer: L.Trainer, module: BillaLM) -> ModelCard:
    """What the export's README.md states, gathered from the config, the data module and the finished run."""
    plan, metrics = hardware.batch, {k: float(v) for k, v in trainer.callback_metrics.items()}
    hw, opt, sched, card = cfg.hardware, cfg.optimizer, cfg.scheduler, cfg.export.get("card") or {}
    data: BillaDataModule = trainer.datamodule
    zero_stage = hardware.zero_stage
    device = torch.cuda.get_device_name(0) if hw.accelerator == "gpu" and torch.cuda.is_available() else hw.accelerator
    finals = {k: v for k, v in sorted(metrics.items()) if k.startswith("val/")}
    if module.val_loss_start is not None:
        finals["val/loss at step 0"] = module.val_loss_start
    if "train/loss" in metrics:
        finals["train/loss (last step)"] = metrics["train/loss"]
    return ModelCard(
        model_name=cfg.model.name,
        stage=cfg.stage_name,
        mix=realised_mix(data.mix, metrics),
        schedule={
            "optimizer steps": f"{trainer.global_step:,} of {cfg.trainer.max_steps:,}",
            "batch": str(plan),
            "sequence length": data.max_seq_length,
            "tokens per step (max)": f"{plan.global_size * data.max_seq_length:,}",
            "learning rate": f"{opt.lr:g}, {sched.get('warmup_steps', 0)} warmup steps, cosine to "
            f"{sched.get('min_lr_ratio', 0)} x lr",
            "optimizer": f"{opt._target_.rsplit('.', 1)[-1]} betas {list(opt.get('betas', []))}, "
            f"weight decay {opt.get('weight_decay')}, gradient clip {cfg.trainer.get('gradient_clip_val')}",
            "data": f"mix {data.mix_mode}, layout {data.layout}, seed {data.seed}",
        },
        hardware={
            "hardware config": hydra_choice("hardware") or "-",
            "device": device,
            "devices": f"{hw.devices} x {hw.num_nodes} node(s)",
            "precision": hw.precision,
            "strategy": f"DeepSpeed ZeRO-{zero_stage}" if zero_stage is not None else str(hw.strategy),
            "activation checkpointing": hw.activation_checkpointing,
        },
        metrics=finals,
        command=card.get("command") or hydra_command(),
        init_from=cfg.get("init_from") or cfg.model.get("pretrained_path"),
        data=dict(sorted(data.stats.items())),
        license=card.get("license", "other"),
        license_name=card.get("license_name"),
        base_model=card.get("base_model"),
        datasets=[*card.get("datasets", []), *hub_datasets(data.sources)],
        tags=list(card.get("tags", [])),
        notes=[
            "Samples and tokens per source are those of the `train/samples/<source>` and `train/tokens/<source>` "
            "metrics at their last logging (every `trainer.log_every_n_steps` steps), summed over ranks, since the "
            "run (re)started."
        ],
    )


def export_probe(datamodule: BillaDataModule) -> dict | None:
    """The batch the export check compares logits on: the first validation batch, or without a validation split
    (BiLLa's own layout, ``data=billa_repo``, has none) this rank's first training micro batch."""
    if datamodule.val_set:
        return next(iter(datamodule.val_dataloader()), None)
    return next(iter(datamodule.train_dataloader()), None)


def export(
    cfg: DictConfig, hardware: HardwarePlan, trainer: L.Trainer, module: BillaLM, tokenizer_dir: str, probe: dict | None
) -> dict:
    """Gather (ZeRO-3: per parameter) and write the HF directory on rank 0; optionally check it against the model."""
    state = gather_state_dict(module.model, trainer.is_global_zero)
    datamodule: BillaDataModule = trainer.datamodule
    samples = trainer.global_step * hardware.batch.global_size
    data_state = datamodule.data_state(samples) if datamodule.streams_used() else None
    trained_logits = probe_logits(module, probe) if probe is not None and cfg.export.verify else None
    result = {"export_dir": str(cfg.export.dir)}
    if trainer.is_global_zero:
        save_hf_model(
            module.model,
            tokenizer_dir,
            cfg.export.dir,
            state,
            cfg.export.max_shard_size,
            model_max_length=trainer.datamodule.max_seq_length,  # the context trained on, not the model's maximum
            generation=OmegaConf.to_container(cfg.export.generation) if cfg.export.get("generation") else None,
            card=model_card(cfg, hardware, trainer, module),
            extra_files={STATE_FILE: json.dumps({"stage": cfg.stage_name, **data_state}, indent=1)}
            if data_state
            else None,
        )
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
        reasons = ("filtered", "skipped_malformed", "empty_text", "no_target_after_truncation")
        dropped = {k: counts.get(k, 0) for k in reasons}
        line = f"{split}: {counts.get('records', 0)} records -> {counts.get('examples', 0)} examples"
        if counts.get("cut_long"):  # kept, cut to what a training window can use before tokenising
            line += f" ({counts['cut_long']} records longer than a window's text cut before tokenising)"
        unmapped = {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("unmapped_type/")}
        if unmapped:  # used, but without a prompt: their type has no prompt file (data.prompt_types)
            line += f" (task types without a prompt file, records trained without a prompt: {unmapped})"
        if any(dropped.values()) or unmapped:
            log.warning("Data report %s; not used: %s %s", line, dropped, counts.get("skipped_examples", [])[:3])
        else:
            log.info("Data report %s", line)


def resume_checkpoint(cfg: DictConfig, hardware: HardwarePlan | None = None) -> str | None:
    """The checkpoint to resume from (``ckpt_path``, or ``resume=auto``), checked before any work is done.

    ``resume=auto`` says where it looked and, when nothing is there, that the run starts from scratch; a newer
    checkpoint a failed save left incomplete is skipped with a warning that names it (``find_resume_checkpoint``).

    Raises:
        UntrustedCheckpointError: the checkpoint's pickles would run code (unless ``trust_checkpoint=true``).
        ConfigError: the checkpoint does not fit the run's hardware plan (``reshard.check_resumable``).
    """
    directory = Path(cfg.output_dir) / "checkpoints"
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("resume"), directory)
    if cfg.get("resume") == "auto" and not cfg.get("ckpt_path"):
        if ckpt_path:
            log.info("resume=auto: the newest complete checkpoint in %s is %s", directory, ckpt_path)
        else:
            log.warning(
                "resume=auto: no complete checkpoint in %s, starting from scratch (every run gets a new output "
                "directory unless hydra.run.dir is fixed: pass hydra.run.dir=<the run to continue>)",
                directory,
            )
    if ckpt_path:  # a checkpoint whose pickles would run code is refused here
        key = "ckpt_path" if cfg.get("ckpt_path") else "resume=auto"
        trust = bool(cfg.get("trust_checkpoint", False))
        check_checkpoint(ckpt_path, key, trust)
        check_resumable(ckpt_path, key, hardware or plan_hardware(cfg, validate(cfg)), trust)
    return ckpt_path


def run(cfg: DictConfig) -> dict:
    """Train one stage as configured and export the result.

    The steps: check the config and derive the batch and hardware plans; build the data module and the
    LightningModule from their ``data:`` / ``module:`` partials, completed with the run-time values; fit; export.

    Returns:
        ``export_dir``, ``val_loss_start``, ``val_loss`` (last validation), ``train_loss``, ``global_step``,
        ``resumed_from`` and, with ``export.verify``, ``export_max_abs_logit_diff``.
    """
    setup_logging()
    redact_hydra_files()  # a key inside a URL or an override never stays in .hydra/*.yaml
    if not cfg.prepare_only:  # tokenising on a CPU node before the GPU job is what prepare_only is for
        check_machine(cfg)  # a GPU config on a CPU machine stops here, before any tokenising or logger
    hardware = plan_hardware(cfg, validate(cfg))  # `auto` hardware values are chosen here, once
    chosen = f" ({hardware.batch.auto})" if hardware.batch.auto else ""
    log.info("Stage %s, model %s, %s%s", cfg.stage_name, cfg.model.name, hardware.batch, chosen)
    ckpt_path = resume_checkpoint(cfg, hardware)
    L.seed_everything(cfg.seed, workers=True)

    tokenizer_dir = instantiate(cfg.model.tokenizer)
    vocab_size = embedding_rows(cfg.model, len(load_tokenizer(tokenizer_dir)))
    runtime = run_time_values(cfg, hardware, tokenizer_dir, vocab_size)
    datamodule: BillaDataModule = complete(cfg.data, runtime, key="data")
    datamodule.check_streams()  # a data-state file that does not fit stops here, before any work
    if cfg.prepare_only:  # tokenise what the stage reads into the cache and stop (e.g. on a CPU node before a GPU job)
        datamodule.prepare_stage()
        report_data(datamodule.stats)
        return {"data": datamodule.stats, "token_cache_dir": datamodule.token_cache_dir}
    memory = check_memory(cfg, hardware, runtime["vocab_size"], datamodule.max_seq_length)
    module: BillaLM = complete(cfg.module, runtime, key="module")
    trainer = build_trainer(cfg, hardware, runtime["vocab_size"], datamodule.max_seq_length, memory)
    if ckpt_path:
        log.info("Resuming from %s", ckpt_path)
    with weights_only_loading(bool(cfg.trust_checkpoint)) if ckpt_path else contextlib.nullcontext():  # DeepSpeed's too
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    probe = export_probe(datamodule) if cfg.export.verify else None
    result = export(cfg, hardware, trainer, module, tokenizer_dir, probe)
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
