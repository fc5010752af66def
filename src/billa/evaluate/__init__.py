"""``run(cfg)``: evaluate one model on the configured tasks (``conf/task/``); write JSON + markdown per task.

Each ``task.<name>`` node is a partial function (``_target_`` + ``_partial_: true``); ``run`` completes it with what
exists only at run time, by parameter name: ``lm`` (the model, loaded once, only if a task asks for it) and
``output_dir``. Every task returns a ``TaskResult``; ``run`` writes ``<task>.json``/``<task>.md``, logs metrics and
tables to the configured logger and keeps ``results.json`` (all tasks' metrics) up to date for ``task=report``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from billa.config import ConfigError
from billa.distributed.safe_load import pretrained_loading
from billa.evaluate.lm import EvalLM, find_export, load_lm
from billa.evaluate.results import log_result, write_result
from billa.utils.logging import get_logger, setup_logging
from billa.utils.secrets import redact, redact_hydra_files

log = get_logger(__name__)

LAST = ("report",)  # tasks that read the others' results run after them
AUTO_BATCH_SIZE = 8  # sequences per forward pass when batch_size is null and hardware.micro_batch_size is auto


def build_lm(cfg: DictConfig) -> EvalLM:
    """Load ``model_path`` (or the newest export) on the configured hardware."""
    hw = cfg.hardware
    if hw.num_nodes != 1:
        raise ConfigError(f"hardware.num_nodes={hw.num_nodes}: evaluation runs on one node (e.g. hardware=8xa100)")
    path = find_export(cfg.get("model_path"), cfg.model.get("pretrained_path"), cfg.exports_glob)
    batch_size = cfg.get("batch_size") or hw.micro_batch_size
    if batch_size == "auto":  # training chooses it from the memory plan and the global batch; evaluation has neither
        batch_size = AUTO_BATCH_SIZE
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"`batch_size` must be a positive integer (or null: hardware.micro_batch_size), got {batch_size!r}"
        )
    name = cfg.get("model_id") or str(path)
    with pretrained_loading(path, "model_path"):  # billa's message for untrusted .bin weights, not torch's
        return load_lm(
            path,
            hw.accelerator,
            hw.devices,
            str(hw.precision),
            batch_size,
            cfg.get("max_length"),
            cfg.get("add_bos", True),
            name,
        )


def _logger(cfg: DictConfig):
    if not cfg.get("logger"):
        return None
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))  # API keys never reach the logger
    return logger


def run(cfg: DictConfig) -> dict:
    """Run every configured task on one model.

    Returns:
        ``output_dir``, ``model_path`` (None when no task needed a model) and ``metrics``: task -> its metrics.
    """
    setup_logging()
    redact_hydra_files()  # a key inside a URL or an override never stays in .hydra/*.yaml
    tasks = dict(cfg.get("task") or {})
    if not tasks:
        raise ConfigError("`task` is empty: choose task=ppl, logiqa2, c3, answers, judge, report or a list [ppl,c3]")
    if any("lm" in inspect.signature(instantiate(node)).parameters for node in tasks.values()):
        from billa.distributed.machine import check_machine

        check_machine(cfg)  # a GPU config on a CPU machine stops before the logger and the model load
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger = _logger(cfg)
    lm: EvalLM | None = None
    summary = {"model_path": None, "model_id": cfg.get("model_id"), "label": cfg.get("label"), "metrics": {}}
    for name in sorted(tasks, key=lambda t: t in LAST):
        fn = instantiate(tasks[name])
        params = inspect.signature(fn).parameters
        runtime = {}
        if "lm" in params:
            lm = lm or build_lm(cfg)
            summary.update(model_path=lm.path, model_id=summary["model_id"] or lm.name)
            runtime["lm"] = lm
        if "output_dir" in params:
            runtime["output_dir"] = str(out)
        log.info("Task %s", name)
        result = fn(**runtime)
        files = write_result(
            out, name, result, header=result.details.get("header") or f"model: {summary['model_id'] or '-'}"
        )
        log_result(logger, name, result)
        summary["metrics"][name] = result.metrics
        (out / "results.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8")
        log.info("%s: %s", name, files["markdown"])
    if logger:
        logger.finalize("success")
    return {"output_dir": str(out), "model_path": summary["model_path"], "metrics": summary["metrics"]}
