"""Compose a billa config in-process, as its door would (``python train.py <overrides>``)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


@contextmanager
def hydra_context():
    """Compose inside the running Hydra app, or (in-process callers, tests) initialise Hydra on ``conf/``."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides``."""
    from hydra import compose as hydra_compose

    with hydra_context():
        return hydra_compose(config_name, overrides=list(overrides))
