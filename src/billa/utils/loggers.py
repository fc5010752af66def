"""Experiment loggers created from ``conf/logger/``."""

from __future__ import annotations

import glob
import json
import netrc
import os
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from billa.utils.logging import get_logger

log = get_logger(__name__)


def wandb_configured() -> bool:
    """True when this machine can log to W&B online: an API key in the environment or a `wandb login` entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


@dataclass(frozen=True)
class RunIdentity:
    """How a run is found in W&B: its name, job type and tags (the group is the pipeline's or the sweep's)."""

    name: str
    job_type: str
    tags: list[str]


def run_identity(
    stage: str,
    model: str,
    variant: str | None = None,
    seed: int | None = None,
    hardware: str | None = None,
    tasks: Iterable[str] | None = None,
    seed_in_name: bool = False,
) -> RunIdentity:
    """billa's one naming scheme for W&B runs (docs/wandb.md, "Finding runs").

    name ``<stage>-<model>[-<variant>][-s<seed>]``; job type the stage (``pretrain``, ``task_mix``, ``sft``, ...) or
    ``eval-<task>[+<task>..]`` for ``evaluate.py``; tags ``model:<m>``, ``stage:<s>``, ``variant:<v>``,
    ``hw:<hardware>``, ``seed:<n>`` (each only when known).

    Args:
        stage: ``stage_name`` (``eval`` for evaluate.py).
        model: ``model.name``.
        variant: the pipeline (ablation variant) the run belongs to; None or ``none`` for a single stage.
        seed: the run's seed.
        hardware: a short description of the hardware, e.g. ``1x8xgpu``.
        tasks: evaluate.py's tasks (only for ``stage == "eval"``).
        seed_in_name: add ``-s<seed>`` to the name (a seed chosen on the command line, as in a seed sweep).
    """
    variant = None if variant in (None, "", "none") else variant
    tasks = list(tasks or [])
    name = "-".join(
        [stage, model] + ([variant] if variant else []) + ([f"s{seed}"] if seed_in_name and seed is not None else [])
    )
    job_type = f"eval-{'+'.join(tasks)}" if stage == "eval" and tasks else stage
    tags = [f"model:{model}", f"stage:{stage}"]
    tags += [f"variant:{variant}"] if variant else []
    tags += [f"hw:{hardware}"] if hardware else []
    tags += [f"seed:{seed}"] if seed is not None else []
    return RunIdentity(name=name, job_type=job_type[:64], tags=tags)  # W&B caps job types at 64 characters


def seed_on_command_line() -> bool:
    """True when the running Hydra app's overrides set ``seed`` (a seed sweep): the seed then goes in run names."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return any(o.split("=", 1)[0].lstrip("+~") == "seed" for o in HydraConfig.get().overrides.task)


def wandb_logger(
    project: str,
    name: str | None,
    save_dir: str,
    mode: str | None = None,
    tags: list[str] | None = None,
    run: Mapping | None = None,
    **kwargs,
) -> WandbLogger:
    """A Lightning ``WandbLogger`` that stays offline unless W&B is configured.

    ``WANDB_MODE`` in the environment wins over ``mode``. W&B's own cache and config directories go under
    ``save_dir`` so an offline run writes nothing to the home directory.

    Args:
        project, save_dir, mode: as ``WandbLogger``'s.
        name: the run's name; None: ``run_identity``'s.
        tags: tags added to ``run_identity``'s.
        run: ``run_identity``'s arguments (``conf/logger/wandb.yaml``'s ``run`` node); its job type and tags are used
            unless ``kwargs`` sets ``job_type``.
    """
    if run is not None:
        identity = run_identity(**dict(run), seed_in_name=seed_on_command_line())
        name = name or identity.name
        kwargs.setdefault("job_type", identity.job_type)
        tags = [*identity.tags, *(tags or [])]
    mode = os.environ.get("WANDB_MODE") or mode or ("online" if wandb_configured() else "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    # W&B's run files go to save_dir (WandbLogger passes it as wandb.init's dir: each stage of a pipeline its own)
    for var, sub in (("WANDB_CACHE_DIR", "wandb/.cache"), ("WANDB_CONFIG_DIR", "wandb/.config")):
        os.environ.setdefault(var, str(Path(save_dir) / sub))
    log.info("W&B logger: project=%s name=%s mode=%s", project, name, mode)
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:  # a new logger is a new run: Lightning's
        sys.modules["wandb"].finish()  # WandbLogger would log into a run an earlier stage or task left open
    return WandbLogger(project=project, name=name, save_dir=save_dir, mode=mode, tags=tags, **kwargs)


def offline_runs(dirs: Iterable[str | Path]) -> list[Path]:
    """The offline W&B runs (``<dir>/wandb/offline-run-*``) under each of ``dirs``, sorted, without repeats."""
    found = {Path(p) for d in dirs for p in glob.glob(str(Path(d) / "wandb" / "offline-run-*"))}
    return sorted(p for p in found if p.is_dir())


def sync_command(dirs: Iterable[str | Path]) -> str | None:
    """The one ``wandb sync`` command that uploads every offline run under ``dirs`` (None when there are none).

    One pattern per directory (``<dir>/wandb/offline-run-*``), so the command stays short and also picks up a run a
    resumed stage adds later; ``wandb sync`` skips runs it has already uploaded.
    """
    dirs = sorted({str(Path(run).parents[1]) for run in offline_runs(dirs)})
    if not dirs:
        return None
    return "wandb sync " + " ".join(f"{shlex.quote(d)}/wandb/offline-run-*" for d in dirs)


def pipeline_run_dirs(root: str | Path) -> list[Path]:
    """Where the runs of every pipeline under ``root`` logged: each stage's directory (in the stage store, wherever
    that is) and each pipeline's ``eval`` directory, as its ``pipeline.json`` lists them; plus ``root`` and its
    subdirectories (single-stage runs of a sweep)."""
    root = Path(root)
    dirs = [root, *(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []
    for summary_path in sorted(root.rglob("pipeline.json")):
        summary = json.loads(summary_path.read_text())
        dirs += [Path(step["dir"]) for step in summary.get("steps", []) if step.get("stage")]
        dirs.append(summary_path.parent / "eval")
    return dirs


class SyncCommandCallback(Callback):
    """Hydra callback: at the end of a multirun, print the one ``wandb sync`` command for all its offline runs."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from billa.utils.logging import setup_logging

        setup_logging()
        command = sync_command(pipeline_run_dirs(config.hydra.sweep.dir))
        if command:
            log.info("Offline W&B runs of this sweep; upload them all (after `wandb login`) with:\n  %s", command)
