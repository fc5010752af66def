"""Chain the recipe's steps (vocabulary -> stage 1 -> stage 2 -> stage 3) and reuse finished stages.

``python train.py pipeline=billa`` runs every step of ``conf/pipeline/billa.yaml`` in one process. Each stage is
composed from ``conf/train.yaml`` exactly as ``python train.py stage=<stage> <your overrides>`` would be, starts from
the previous stage's export (``init_from``), and runs in a directory of the stage store named by a key of everything
that determines its result: the resolved stage config (without output paths and loggers), the content of its data
files and the key of the stage it starts from. So:

- a stage whose directory holds ``DONE.json`` is reused, not retrained (sweeps that share stage 1 train it once);
- any change upstream (a config value, a data file, the previous stage) gives a new key and a new run;
- a half-finished stage resumes from its newest complete checkpoint (``resume=auto``).

After the last step the final export is scored on the validation split of every source the data config defines,
token-weighted per source and per source kind, and everything is written to ``<output_dir>/pipeline.json``; a Hydra
multirun over pipelines ends with a comparison table (``billa.compare``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from billa.utils.logging import get_logger, setup_logging

log = get_logger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DONE = "DONE.json"
# Keys that name where a run writes or how it reports, not what it trains: left out of a stage's key.
_NOT_IN_KEY = ("output_dir", "export", "logger", "resume", "ckpt_path", "prepare_only", "stop_after_steps", "pipeline")
_NOT_IN_KEY_TRAINER = ("enable_progress_bar", "log_every_n_steps")


@contextmanager
def _hydra_context():
    """Compose inside the running Hydra app, or (in-process callers, tests) initialise Hydra on ``conf/``."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def compose_stage(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, as ``python train.py <overrides>`` would compose it."""
    from hydra import compose

    with _hydra_context():
        return compose("train", overrides=overrides)


def user_overrides(cfg: DictConfig) -> list[str]:
    """The command line's overrides (without ``pipeline=`` / ``stage=``), applied to every step of the pipeline."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return [o for o in overrides if not o.lstrip("+~").startswith(("pipeline", "stage="))]


def _data_fingerprints(cfg: DictConfig) -> dict:
    """Content hashes of every file the stage reads (hashed once per file; see billa.data.cache.file_fingerprint)."""
    from hydra.utils import instantiate

    from billa.data.cache import file_fingerprint
    from billa.data.readers import expand_paths

    if cfg.data.get("build"):
        instantiate(cfg.data.build)  # the sample data is built on first use
    cache_root = Path(cfg.data.token_cache_dir)
    cache_root.mkdir(parents=True, exist_ok=True)
    prints = {}
    for name in cfg.data.mix:
        spec = cfg.data.sources[name]
        for split in ("train", "val"):
            if spec.get(split):
                files = expand_paths(spec[split], f"data.sources.{name}.{split}")
                prints[f"{name}/{split}"] = [file_fingerprint(f, cache_root) for f in files]
    return prints


def stage_key(cfg: DictConfig, parent_key: str | None) -> str:
    """What determines a stage's result: resolved config (minus paths and loggers), data content, the parent stage."""
    resolved = OmegaConf.to_container(cfg, resolve=False)
    resolved = {k: v for k, v in resolved.items() if k not in _NOT_IN_KEY}
    resolved["trainer"] = {k: v for k, v in resolved["trainer"].items() if k not in _NOT_IN_KEY_TRAINER}
    payload = {
        "config": OmegaConf.to_container(OmegaConf.create(resolved), resolve=True),
        "data": _data_fingerprints(cfg),
        "parent": parent_key,
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _stage_config(step: DictConfig, base_overrides: list[str], init_from: str | None, group: str) -> DictConfig:
    overrides = [*base_overrides, f"stage={step.stage}", *list(step.get("overrides") or [])]
    cfg = compose_stage(overrides)
    with open_dict(cfg):
        cfg.init_from = init_from
        cfg.resume = "auto"  # a half-finished stage continues from its newest complete checkpoint
        if cfg.export.get("card") is not None:  # the model card names the command that reproduces this stage
            start = f" init_from={init_from}" if init_from else ""
            cfg.export.card.command = f"python train.py {' '.join(overrides)}{start}"
        if cfg.get("logger") and "group" in cfg.logger:
            cfg.logger.group = group  # every stage and every variant of a sweep in one W&B group
    return cfg


def run_step(step: DictConfig, cfg: DictConfig, parent_key: str | None, store: Path) -> dict:
    """Train one stage unless a finished run of the same key is in the store; returns its summary."""
    from billa.train import run as train_stage

    key = stage_key(cfg, parent_key)
    stage_dir = store / f"{step.name}-{step.stage}-{key}"
    done = stage_dir / DONE
    if done.is_file():
        summary = json.loads(done.read_text())
        log.info(
            "Pipeline step %s (stage=%s): reusing %s (same config, data and start weights)",
            step.name,
            step.stage,
            stage_dir,
        )
        return {**summary, "reused": True}
    resuming = (stage_dir / "checkpoints").is_dir() and any((stage_dir / "checkpoints").iterdir())
    log.info(
        "Pipeline step %s: stage=%s init_from=%s -> %s%s",
        step.name,
        step.stage,
        cfg.init_from,
        stage_dir,
        " (resuming)" if resuming else "",
    )
    with open_dict(cfg):
        cfg.output_dir = str(stage_dir)
    start = time.time()
    result = train_stage(cfg)
    summary = {
        "step": step.name,
        "stage": step.stage,
        "key": key,
        "dir": str(stage_dir),
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
        log.warning(
            "Pipeline step %s stopped at step %d of %d: rerun to continue",
            step.name,
            result["global_step"],
            cfg.trainer.max_steps,
        )
        return {**summary, "reused": False}
    if _is_global_zero():
        tmp = done.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(done)  # written last: a stage without DONE.json is unfinished
    return {**summary, "reused": False}


def _is_global_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run_vocab(cfg: DictConfig, pipeline: DictConfig, store: Path) -> tuple[dict, list[str]]:
    """The vocabulary step: an ``expand_vocab`` op (then every stage starts from its output), or the model group's
    own tokenizer (``model=tiny`` expands its English base with the sample's Chinese in the cache)."""
    from hydra.utils import instantiate

    if pipeline.get("vocab"):
        node = OmegaConf.to_container(pipeline.vocab, resolve=True)
        key = hashlib.blake2b(json.dumps(node, sort_keys=True).encode(), digest_size=8).hexdigest()
        out_dir = store / f"vocab-{key}"
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


def run_pipeline(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Run the configured pipeline (``cfg.pipeline``): vocabulary, then each stage from the previous one's export.

    Args:
        cfg: the composed ``train.yaml`` with a ``pipeline`` node (``conf/pipeline/<name>.yaml``).
        overrides: overrides applied to every stage; default: the command line's (``user_overrides``).

    Returns:
        The pipeline summary also written to ``<output_dir>/pipeline.json``: the steps (key, directory, reused or
        trained, losses), the final export and its validation loss per source and per source kind.
    """
    setup_logging()
    pipeline = cfg.pipeline
    base_overrides = user_overrides(cfg) if overrides is None else list(overrides)
    store = Path(pipeline.store_dir).absolute()
    store.mkdir(parents=True, exist_ok=True)
    group = pipeline.get("group") or default_group(pipeline.name, cfg.output_dir)
    log.info("Pipeline %s: %s; stage store %s", pipeline.name, " -> ".join(s.name for s in pipeline.steps), store)

    vocab, vocab_overrides = run_vocab(cfg, pipeline, store)
    log.info("Pipeline step vocab: %s (%s)", vocab["dir"], _summarise_vocab(vocab["report"]))
    steps, init_from, parent_key = [vocab], cfg.get("init_from"), None
    status = "done"
    for step in pipeline.steps:
        stage_cfg = _stage_config(step, [*base_overrides, *vocab_overrides], init_from, group)
        summary = run_step(step, stage_cfg, parent_key, store)
        steps.append(summary)
        if not summary.get("finished", True):
            status = "stopped"
            break
        init_from, parent_key = summary["export_dir"], summary["key"]

    result = {
        "pipeline": pipeline.name,
        "status": status,
        "group": group,
        "overrides": base_overrides,
        "steps": steps,
        "final_export": init_from,
        "trained_steps": sum(s.get("global_step", 0) for s in steps if not s.get("reused", True)),
    }
    if status == "done" and pipeline.get("evaluate", True) and _is_global_zero():
        result["validation"] = evaluate_by_kind(init_from, cfg)
        log.info("Pipeline %s: final validation loss by kind %s", pipeline.name, result["validation"]["by_kind"])
    tasks = list(pipeline.get("evaluate_tasks") or [])
    if status == "done" and tasks and _is_global_zero():
        result["evaluation"] = run_evaluation(init_from, tasks, cfg, base_overrides, group)
    if _is_global_zero():
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pipeline.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return result


def run_evaluation(model_dir: str, tasks: list[str], cfg: DictConfig, overrides: list[str], group: str) -> dict:
    """``evaluate.py task=[...]`` on the final export (same model / hardware / logger groups); returns its metrics."""
    from billa.evaluate import run as evaluate

    groups = [o for o in overrides if o.split("=", 1)[0].lstrip("+") in ("model", "hardware", "logger")]
    with _hydra_context():
        from hydra import compose

        eval_cfg = compose("evaluate", overrides=[*groups, f"task=[{','.join(tasks)}]"])
    with open_dict(eval_cfg):
        eval_cfg.model_path = model_dir
        eval_cfg.output_dir = str(Path(cfg.output_dir) / "eval")
        eval_cfg.cache_dir = cfg.cache_dir
        eval_cfg.seed = cfg.seed
        if eval_cfg.get("logger") and "group" in eval_cfg.logger:
            eval_cfg.logger.group = group
    return evaluate(eval_cfg)["metrics"]


# ---- validation loss of the final model on every source kind ----------------------------------------------------

EVAL_OBJECTIVES = {  # the objective each record kind trains with in its own stage
    "text": "conditional_generation",
    "translation": "translation",
    "task": "task",
    "instruction": "dialogue",
}


def evaluate_by_kind(model_dir: str, cfg: DictConfig, batch_size: int = 16) -> dict:
    """Token-weighted validation loss of ``model_dir`` on the val split of every source in ``data.sources``.

    Every variant of an ablation is scored on the same examples (same seed, same objectives: each record kind with
    the objective of the stage that trains it), so the losses compare across pipelines.

    Returns:
        ``{"by_source": {name: {"loss", "tokens", "kind"}}, "by_kind": {kind: loss}, "overall": loss}``.
    """
    import torch
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM

    from billa.data.collate import PadCollator
    from billa.data.datamodule import BillaDataModule
    from billa.data.readers import record_kind

    sources = OmegaConf.to_container(cfg.data.sources, resolve=True)
    with_val = {name: spec for name, spec in sources.items() if spec.get("val")}
    datamodule = BillaDataModule(
        sources=with_val,
        mix={name: 1 for name in with_val},
        objectives=EVAL_OBJECTIVES,
        tokenizer_dir=model_dir,
        max_seq_length=cfg.data.max_seq_length,
        micro_batch_size=batch_size,
        num_samples=1,
        seed=cfg.seed,
        val_max_records=cfg.data.get("val_max_records", 1000),
        build=instantiate(cfg.data.build, _partial_=True) if cfg.data.get("build") else None,
        prompts_dir=cfg.data.get("prompts_dir"),
        prompt_types=OmegaConf.to_container(cfg.data.prompt_types) if cfg.data.get("prompt_types") else None,
        translation_prompts=OmegaConf.to_container(cfg.data.translation_prompts, resolve=True)
        if cfg.data.get("translation_prompts")
        else None,
        token_cache_dir=cfg.data.get("token_cache_dir"),
        num_proc=cfg.data.get("num_proc", 1),
    )
    if datamodule.build is not None:
        datamodule.build()
    rows = datamodule.setup_validation()  # validation splits only
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    collate = PadCollator(datamodule.pad_id)
    totals: dict[str, list[float]] = {}
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = collate(chunk)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )  # (B, T-1)
            for row, name in enumerate(batch["source"]):
                mask = labels[row] != -100
                total = totals.setdefault(name, [0.0, 0])
                total[0] += float(nll[row][mask].sum())
                total[1] += int(mask.sum())
    by_source = {
        name: {
            "loss": total / max(tokens, 1),
            "tokens": tokens,
            "kind": with_val[name].get("kind") or record_kind(with_val[name]["format"]),
        }
        for name, (total, tokens) in sorted(totals.items())
    }
    by_kind: dict[str, list[float]] = {}
    for name, (total, tokens) in totals.items():
        kind_total = by_kind.setdefault(by_source[name]["kind"], [0.0, 0])
        kind_total[0] += total
        kind_total[1] += tokens
    all_nll, all_tokens = sum(t for t, _ in totals.values()), sum(n for _, n in totals.values())
    return {
        "by_source": by_source,
        "by_kind": {kind: total / max(tokens, 1) for kind, (total, tokens) in sorted(by_kind.items())},
        "overall": all_nll / max(all_tokens, 1),
        "ppl": math.exp(min(all_nll / max(all_tokens, 1), 30)),
    }
