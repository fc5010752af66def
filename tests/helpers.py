"""What many test files build the same way: a tiny LLaMA, a BillaLM on it, a quiet Trainer, an entry point run.

Imported by ``tests/conftest.py`` before anything heavy is: the builders import torch, transformers, lightning and
billa when called, not at import.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The shape of conf/model/tiny.yaml's architecture, scaled down to a real LLaMA forward pass in milliseconds; a test
# that depends on a size (a row count, a hidden size in its expected values) names it in its call.
TINY_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}


def tiny_llama_config(vocab_size: int, **architecture: Any):
    """``TINY_ARCH`` updated with ``architecture``, as a ``LlamaConfig`` built the way billa builds one."""
    from billa.model.builders import llama_config

    return llama_config({**TINY_ARCH, **architecture}, vocab_size)


def tiny_llama(vocab_size: int, *, seed: int | None = None, **architecture: Any):
    """A random-init ``LlamaForCausalLM`` of ``tiny_llama_config`` (after ``torch.manual_seed(seed)`` if given)."""
    import torch
    from transformers import LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size, **architecture))


def tiny_module(
    model: Mapping,
    vocab_size: int,
    *,
    optimizer: Mapping | None = None,
    scheduler: Mapping | None = None,
    total_steps: int = 1,
    seed: int | None = None,
    configure: bool = True,
    **kwargs: Any,
):
    """A ``BillaLM`` on ``model``: a whole model config (with ``architecture``) or only an architecture (random init).

    Config nodes are turned into plain containers, resolved; ``seed`` seeds torch first; ``configure`` builds the
    model now (``configure_model``) rather than at ``Trainer.fit``.
    """
    import torch
    from omegaconf import OmegaConf

    from billa.model.module import BillaLM

    def plain(node: Mapping | None) -> Mapping:
        if node is None:
            return {}
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    model = plain(model)
    if "architecture" not in model:
        model = {"architecture": model, "pretrained_path": None}
    if seed is not None:
        torch.manual_seed(seed)
    module = BillaLM(
        model=model,
        vocab_size=vocab_size,
        optimizer=plain(optimizer),
        scheduler=plain(scheduler),
        total_steps=total_steps,
        **kwargs,
    )
    if configure:
        module.configure_model()
    return module


@functools.cache
def _benchmark_harness():
    """``benchmarks/harness.py``, which the benchmark scripts import as ``harness`` (``benchmarks/`` is no package)."""
    spec = importlib.util.spec_from_file_location("billa_benchmark_harness", ROOT / "benchmarks" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quiet_trainer(**overrides: Any):
    """The benchmarks' quiet ``L.Trainer`` (no logger, checkpoints, progress bar, summary or validation)."""
    return _benchmark_harness().quiet_trainer(**overrides)


def _door(script: str, args: tuple[str, ...], env: Mapping[str, str | None] | None) -> tuple[list[str], dict]:
    command = [sys.executable, script, *args]
    merged = {**os.environ, **(env or {})}
    return command, {key: value for key, value in merged.items() if value is not None}


def run_door(
    script: str,
    *args: str,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | str = ROOT,
    timeout: float = 300,
    merge_output: bool = False,
) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in a fresh interpreter, as a user runs an entry point (train.py, convert.py, ...).

    Runs in ``cwd`` (the repository root unless told) with this process's environment updated by ``env`` (a None
    value unsets the variable); stdout and stderr are captured as text, or with ``merge_output`` both in stdout
    (a job log's view).
    """
    command, environment = _door(script, args, env)
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if merge_output else {"capture_output": True}
    return subprocess.run(command, cwd=cwd, env=environment, text=True, timeout=timeout, **streams)


def start_door(
    script: str, *args: str, env: Mapping[str, str | None] | None = None, cwd: Path | str = ROOT
) -> subprocess.Popen:
    """``run_door`` without waiting: the process, its stdout and stderr piped as text (for a test that kills it)."""
    command, environment = _door(script, args, env)
    return subprocess.Popen(
        command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
