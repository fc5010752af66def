"""Conversions run by ``convert.py``: ZeRO-3 checkpoint -> HF, vocabulary expansion, release/restore/verify."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from billa.config import exit_on_config_error
from billa.utils.logging import setup_logging


def run(cfg: DictConfig) -> dict:
    """Run the operation configured under ``op`` (``conf/op/<name>.yaml``) and return its summary.

    A ``ConfigError`` ends the process with a ``billa: error: ...`` block and exit status 2 (see ``billa.config``).
    """
    setup_logging()
    with exit_on_config_error():
        return instantiate(cfg.op)
