"""What the entry points run: each door (``train.py``, ``evaluate.py``, ``convert.py``, ``chat.py``, ``rationale.py``)
calls one function here, which runs its command inside billa's one error path (``billa.utils.errors``).

The layers: the door -> here -> ``billa.pipeline`` (a chain of stages, each one ``billa.train.run``),
``billa.train.run``, ``billa.evaluate.run``, ``billa.convert.run``, ``billa.chat.run`` or ``billa.rationale.run``.
Nothing below imports this module.

An error billa raises on purpose (a config value, a malformed data file, an untrusted checkpoint, a missing file
named by a config key) ends the process with one ``billa: error: ...`` block and exit status 2, like a bad Hydra
group choice; its stack trace goes to the run's log file, and ``HYDRA_FULL_ERROR=1`` re-raises it. Every other
exception propagates unchanged. Under ``-m`` the first job that fails this way ends the sweep.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from billa.utils.errors import exit_on_error


def train(cfg: DictConfig) -> dict:
    """``python train.py``: ``pipeline=<name>`` runs that pipeline, ``inspect=N`` prints samples, else one stage."""
    with exit_on_error():
        if cfg.pipeline.steps:
            from billa.pipeline import command_line_overrides, run_pipeline

            return run_pipeline(cfg, command_line_overrides())
        if cfg.inspect:
            from billa.inspect_masks import inspect_stage

            return inspect_stage(cfg)
        from billa.train import run

        return run(cfg)


def evaluate(cfg: DictConfig) -> dict:
    """``python evaluate.py``: run the configured tasks, then print each task's markdown table."""
    with exit_on_error():
        from billa.evaluate import run

        result = run(cfg)
    from rich.console import Console

    console = Console(soft_wrap=True)
    for task in result["metrics"]:  # the tables on stdout, as written (no rich markup)
        console.print(
            Path(result["output_dir"], f"{task}.md").read_text(encoding="utf-8"), markup=False, highlight=False
        )
    return result


def convert(cfg: DictConfig) -> dict:
    """``python convert.py op=<name>``: one conversion (``conf/op/``)."""
    with exit_on_error():
        from billa.convert import run

        return run(cfg)


def chat(cfg: DictConfig) -> list:
    """``python chat.py``: answer the configured prompts (or chat on a terminal) with an exported model."""
    with exit_on_error():
        from billa.chat import run

        return run(cfg)


def rationale(cfg: DictConfig) -> dict:
    """``python rationale.py``: stage-2 rationales; a missing API key or a dead endpoint is a billa error."""
    from billa.openai_client import OpenAIConfigError
    from billa.rationale import RationaleError

    with exit_on_error(also=(OpenAIConfigError, RationaleError)):
        from billa.rationale import run

        return run(cfg)
