"""Conversions run by ``convert.py``: ZeRO-3 checkpoint -> HF, vocabulary expansion, release/restore/verify."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from billa.utils.logging import setup_logging


def run(cfg: DictConfig) -> dict:
    """Run the operation configured under ``op`` (``conf/op/<name>.yaml``) and return its summary."""
    setup_logging()
    return instantiate(cfg.op)
