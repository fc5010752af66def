"""Stage-2 rationale generation through an OpenAI-compatible chat API (``python rationale.py``)."""

from billa.rationale.generate import RationaleError, run

__all__ = ["RationaleError", "run"]
