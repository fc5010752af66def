"""Experiment loggers created from ``conf/logger/``."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

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


def wandb_logger(
    project: str,
    name: str,
    save_dir: str,
    mode: str | None = None,
    tags: list[str] | None = None,
    **kwargs,
) -> WandbLogger:
    """A Lightning ``WandbLogger`` that stays offline unless W&B is configured.

    ``WANDB_MODE`` in the environment wins over ``mode``. W&B's own cache and config directories go under
    ``save_dir`` so an offline run writes nothing to the home directory.
    """
    mode = os.environ.get("WANDB_MODE") or mode or ("online" if wandb_configured() else "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb/.cache"), ("WANDB_CONFIG_DIR", "wandb/.config")):
        os.environ.setdefault(var, str(Path(save_dir) / sub))
    log.info("W&B logger: project=%s name=%s mode=%s", project, name, mode)
    return WandbLogger(project=project, name=name, save_dir=save_dir, mode=mode, tags=tags, **kwargs)
