"""Rank-aware logging: library code logs through here, never with bare ``print``."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only


def get_logger(name: str) -> logging.Logger:
    """Return a logger whose info/warning calls only emit on global rank 0.

    Errors and criticals are emitted on every rank: a failure on rank 3 must be visible.
    """
    logger = logging.getLogger(name)
    for level in ("debug", "info", "warning"):
        setattr(logger, level, rank_zero_only(getattr(logger, level)))
    return logger


def setup_logging(level: int = logging.INFO) -> None:
    """Send billa's logs to stderr once (Hydra configures the root logger when it runs the entry point)."""
    logger = logging.getLogger("billa")
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
