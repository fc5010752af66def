"""Chain the recipe's steps (vocabulary -> stage 1 -> stage 2 -> stage 3) and reuse finished stages.

``python train.py pipeline=billa`` runs every step of ``conf/pipeline/billa.yaml`` in one process, a layer above
training (``billa.cli`` calls it; ``billa.train`` never does). Each stage is composed from ``conf/train.yaml`` exactly
as ``python train.py stage=<stage> <your overrides>`` would be: the command line's overrides are read once
(``command_line_overrides``) and travel as a list. The values the pipeline owns (start weights, output directory,
resume, W&B group, the model card's command) are set in one place (``_pipeline_values``). Each stage starts from the
previous stage's export and runs in the stage store (``billa.pipeline.store``), so finished stages are reused and a
half-finished one resumes.

After the last step the final export is scored by ``evaluate.py`` tasks on it: ``val_loss`` (the validation loss
per source and per source kind, on the final stage's data config; ``pipeline.evaluate``) and
``pipeline.evaluate_tasks``. Everything is written to ``<output_dir>/pipeline.json``; a Hydra multirun over pipelines
ends with a comparison table (``billa.compare``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from billa.pipeline.store import StageStore, stage_key
from billa.utils.compose import compose
from billa.utils.logging import get_logger, setup_logging

log = get_logger(__name__)

_PIPELINE_GROUPS = ("pipeline", "stage")  # chosen by the pipeline for each step, not by the command line


def command_line_overrides() -> list[str]:
    """The command line's overrides, parsed once, without the ``pipeline`` and ``stage`` choices the pipeline makes.

    Parsed with Hydra's own override grammar (``+stage=x``, ``~pipeline``, ``stage.foo=1`` are told apart by key,
    not by string prefix); applied to every step of the pipeline.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return _select(list(HydraConfig.get().overrides.task), lambda key: key not in _PIPELINE_GROUPS)


def _pipeline_values(
    cfg: DictConfig, overrides: list[str], init_from: str | None, group: str, variant: str | None = None
) -> dict:
    """What the pipeline sets in every stage config, in one place: start weights, resume, W&B group, card command."""
    start = f" init_from={init_from}" if init_from else ""
    values: dict = {"init_from": init_from, "resume": "auto"}  # a half-finished stage continues where it stopped
    if cfg.export.get("card") is not None:  # the model card names the command that reproduces this stage
        values["export"] = {"card": {"command": f"python train.py {' '.join(overrides)}{start}"}}
    if cfg.get("logger") and "group" in cfg.logger:
        values["logger"] = {"group": group}  # every stage and every variant of a sweep in one W&B group
        if "run" in cfg.logger:  # the run's name and tags carry the variant (billa.utils.loggers.run_identity)
            values["logger"]["run"] = {"variant": variant}
    return values


def stage_config(
    step: DictConfig, base_overrides: list[str], init_from: str | None, group: str, variant: str | None = None
) -> tuple[DictConfig, list[str]]:
    """One step's config, ``train.yaml`` + overrides + ``stage=<step.stage>`` + the step's own, and that list."""
    overrides = [*base_overrides, f"stage={step.stage}", *list(step.get("overrides") or [])]
    cfg = compose("train", overrides)
    with open_dict(cfg):
        cfg.merge_with(_pipeline_values(cfg, overrides, init_from, group, variant))
    return cfg, overrides


def run_step(step: DictConfig, cfg: DictConfig, parent_key: str | None, store: StageStore) -> dict:
    """Train one stage unless a finished run of the same key is in the store; returns its summary."""
    from billa.train import run as train_stage

    key = stage_key(cfg, parent_key)
    stage_dir = store.stage(step.name, step.stage, key)
    done = stage_dir.done
    if done is not None:
        log.info("Pipeline step %s (stage=%s): reusing %s (same config, data and start weights)", step.name,
                 step.stage, stage_dir.path)  # fmt: skip
        return {**done, "reused": True}
    log.info("Pipeline step %s: stage=%s init_from=%s -> %s%s", step.name, step.stage, cfg.init_from, stage_dir.path,
             " (resuming)" if stage_dir.resumable else "")  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(stage_dir.path)
    start = time.time()
    result = train_stage(cfg)
    _finish_wandb_run()
    summary = {
        "step": step.name,
        "stage": step.stage,
        "key": key,
        "dir": str(stage_dir.path),
        "export_dir": result["export_dir"],
        "init_from": cfg.init_from,
        "global_step": result["global_step"],
        "val_loss_start": result["val_loss_start"],
        "val_loss": result["val_loss"],
        "train_loss": result["train_loss"],
        "seconds": round(time.time() - start, 1),
        "resumed": bool(result.get("resumed_from")),
        "finished": result["global_step"] >= cfg.trainer.max_steps,
    }
    if not summary["finished"]:  # stop_after_steps: resumable, not done; later stages must not start from it
        log.warning("Pipeline step %s stopped at step %d of %d: rerun to continue", step.name, result["global_step"],
                    cfg.trainer.max_steps)  # fmt: skip
    elif _is_global_zero():
        stage_dir.finish(summary)
    return {**summary, "reused": False}


def _finish_wandb_run() -> None:
    """End the step's W&B run: Lightning's ``WandbLogger`` reuses a run still open, so without this every later
    stage and the evaluation would log into the first stage's run."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def _is_global_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run_vocab(cfg: DictConfig, pipeline: DictConfig, store: StageStore) -> tuple[dict, list[str]]:
    """The vocabulary step: an ``expand_vocab`` op (then every stage starts from its output), or the model group's
    own tokenizer (``model=tiny`` expands its English base with the sample's Chinese in the cache)."""
    from hydra.utils import instantiate

    if pipeline.get("vocab"):
        node = OmegaConf.to_container(pipeline.vocab, resolve=True)
        out_dir = store.vocab(node)
        if not (out_dir / "expansion_report.json").is_file():
            instantiate({**node, "out_dir": str(out_dir)})
        report = json.loads((out_dir / "expansion_report.json").read_text())
        return {"step": "vocab", "dir": str(out_dir), "report": report}, [f"model.pretrained_path={out_dir}"]
    tokenizer_dir = Path(instantiate(cfg.model.tokenizer))
    report_path = tokenizer_dir / "expansion_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return {"step": "vocab", "dir": str(tokenizer_dir), "report": report}, []


def _summarise_vocab(report: dict | None) -> str:
    if not report:
        return "no expansion report (tokenizer used as is)"
    parts = [f"{report.get('pieces_added', '?')} pieces added"]
    for lang in ("zh", "en"):
        if isinstance(report.get(lang), dict):
            before, after = report[lang]["before"]["tokens_per_char"], report[lang]["after"]["tokens_per_char"]
            parts.append(f"{lang} tokens/char {before:.3f} -> {after:.3f}")
    return ", ".join(parts)


def default_group(name: str, output_dir: str) -> str:
    """The W&B group of a pipeline's stages: one per sweep (every variant together), else one per run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"
    return f"{name}-{Path(output_dir).name}"


def run_pipeline(cfg: DictConfig, overrides: list[str]) -> dict:
    """Run the configured pipeline (``cfg.pipeline``): vocabulary, then each stage from the previous one's export.

    Args:
        cfg: the composed ``train.yaml`` with a ``pipeline`` node (``conf/pipeline/<name>.yaml``).
        overrides: overrides applied to every stage (the door passes ``command_line_overrides()``).

    Returns:
        The pipeline summary also written to ``<output_dir>/pipeline.json``: the steps (key, directory, reused or
        trained, losses), the final export, its validation loss per source and per source kind (``validation``) and
        the other evaluation tasks' metrics (``evaluation``).
    """
    setup_logging()
    if not cfg.prepare_only:  # the machine is checked before the vocabulary step does any work
        from billa.distributed.machine import check_machine

        check_machine(cfg)
    pipeline = cfg.pipeline
    store = StageStore(pipeline.store_dir)
    group = pipeline.get("group") or default_group(pipeline.name, cfg.output_dir)
    log.info("Pipeline %s: %s; stage store %s", pipeline.name, " -> ".join(s.name for s in pipeline.steps), store.root)

    vocab, vocab_overrides = run_vocab(cfg, pipeline, store)
    log.info("Pipeline step vocab: %s (%s)", vocab["dir"], _summarise_vocab(vocab["report"]))
    base_overrides = [*overrides, *vocab_overrides]
    steps, init_from, parent_key, last_overrides = [vocab], cfg.get("init_from"), None, base_overrides
    status = "done"
    for step in pipeline.steps:
        stage_cfg, last_overrides = stage_config(step, base_overrides, init_from, group, pipeline.name)
        summary = run_step(step, stage_cfg, parent_key, store)
        steps.append(summary)
        if not summary.get("finished", True):
            status = "stopped"
            break
        init_from, parent_key = summary["export_dir"], summary["key"]

    result = {
        "pipeline": pipeline.name,
        "status": status,
        "seed": cfg.seed,  # a sweep dimension: billa.compare summarises a variant's seeds as mean +- std
        "group": group,
        "overrides": list(overrides),
        "steps": steps,
        "final_export": init_from,
        "trained_steps": sum(s.get("global_step", 0) for s in steps if not s.get("reused", True)),
    }
    tasks = (["val_loss"] if pipeline.get("evaluate", True) else []) + list(pipeline.get("evaluate_tasks") or [])
    if status == "done" and tasks and _is_global_zero():
        result.update(evaluate_final(init_from, tasks, cfg, last_overrides, group))
    if _is_global_zero():
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pipeline.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
        _log_sync_command(out)
    return result


def _log_sync_command(out: Path) -> None:
    """Where stages logged to W&B offline: the one ``wandb sync`` command for them (a sweep prints its own, once)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from billa.utils.loggers import pipeline_run_dirs, sync_command

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return  # billa.utils.loggers.SyncCommandCallback prints one command for the whole sweep
    command = sync_command(pipeline_run_dirs(out))
    if command:
        log.info("Offline W&B runs of this pipeline; upload them (after `wandb login`) with:\n  %s", command)


def evaluate_final(model_dir: str, tasks: list[str], cfg: DictConfig, stage_overrides: list[str], group: str) -> dict:
    """``evaluate.py task=[...]`` on the final export (same model / hardware / logger groups as the pipeline).

    ``val_loss`` scores the final stage's data config: it composes ``train.yaml`` with the overrides that stage was
    composed with, so its sources, objectives' options and ``data.on_error`` are the ones the stage trained with.

    Returns:
        ``validation`` (the ``val_loss`` task's per-source / per-kind losses) and ``evaluation`` (the other tasks'
        metrics), each only when its task ran.
    """
    from billa.evaluate import run as evaluate

    groups = _select(stage_overrides, lambda key: key in ("model", "hardware", "logger"))
    eval_cfg = compose("evaluate", [*groups, f"task=[{','.join(tasks)}]"])
    with open_dict(eval_cfg):
        eval_cfg.model_path = model_dir
        eval_cfg.output_dir = str(Path(cfg.output_dir) / "eval")
        eval_cfg.cache_dir = cfg.cache_dir
        eval_cfg.seed = cfg.seed
        if "val_loss" in tasks:
            eval_cfg.task.val_loss.overrides = stage_overrides
        if eval_cfg.get("logger") and "group" in eval_cfg.logger:
            eval_cfg.logger.group = group
            if "run" in eval_cfg.logger:  # named and tagged with the variant it evaluates
                eval_cfg.logger.run.variant = cfg.pipeline.name
    summary = evaluate(eval_cfg)
    _finish_wandb_run()
    out: dict = {}
    if "val_loss" in tasks:
        out["validation"] = json.loads((Path(summary["output_dir"]) / "val_loss.json").read_text())["details"]
    others = {name: metrics for name, metrics in summary["metrics"].items() if name != "val_loss"}
    if others:
        out["evaluation"] = others
    return out


def _select(overrides: list[str], keep) -> list[str]:
    """The overrides whose key or group (as Hydra's override grammar parses it) ``keep`` accepts, in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [text for text, override in zip(overrides, parsed, strict=True) if keep(override.key_or_group)]
