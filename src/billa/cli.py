"""What ``train.py`` runs: a pipeline, the mask inspector or one stage, chosen from the composed config.

The layers: the door (``train.py``) -> here -> ``billa.pipeline`` (a chain of stages, each one ``billa.train.run``)
or ``billa.train.run`` itself. Nothing below imports this module or the pipeline.

A ``ConfigError`` (a bad value the user can fix by changing the named keys) ends the process with one
``billa: error: ...`` block and exit status 2, like a bad Hydra group choice; ``HYDRA_FULL_ERROR=1`` re-raises it with
its stack trace. Every other exception propagates unchanged.
"""

from __future__ import annotations

from omegaconf import DictConfig

from billa.config import exit_on_config_error


def train(cfg: DictConfig) -> dict:
    """``python train.py``: ``pipeline=<name>`` runs that pipeline, ``inspect=N`` prints samples, else one stage."""
    with exit_on_config_error():
        if cfg.pipeline.steps:
            from billa.pipeline import command_line_overrides, run_pipeline

            return run_pipeline(cfg, command_line_overrides())
        if cfg.inspect:
            from billa.inspect_masks import inspect_stage

            return inspect_stage(cfg)
        from billa.train import run

        return run(cfg)
