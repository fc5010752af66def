"""Rank-aware logging: library code logs through here, never with bare ``print``."""

from __future__ import annotations

import logging

# Libraries that log one INFO line per HTTP request ("HTTP Request: POST ... 200 OK"): thousands of lines in
# rationale.log / evaluate.log that bury billa's own; their warnings still show. Recent openai releases send through
# httpx2 (logger "httpx2"), older ones through httpx: both are named.
CHATTY_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")


def get_logger(name: str) -> logging.Logger:
    """Return a logger whose info/warning calls only emit on global rank 0.

    Errors and criticals are emitted on every rank: a failure on rank 3 must be visible.
    """
    from lightning.pytorch.utilities import rank_zero_only  # here: the OpenAI-only CLIs start without lightning

    logger = logging.getLogger(name)
    for level in ("debug", "info", "warning"):
        setattr(logger, level, rank_zero_only(getattr(logger, level)))
    return logger


def quiet_chatty_loggers(level: int = logging.WARNING) -> None:
    """Raise the level of the per-request HTTP loggers (``CHATTY_LOGGERS``) to ``level``."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def setup_logging(level: int = logging.INFO) -> None:
    """Send billa's logs to stderr once (Hydra configures the root logger when it runs the entry point), and keep
    the HTTP client libraries' per-request INFO lines out of the job log."""
    logger = logging.getLogger("billa")
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    quiet_chatty_loggers()
