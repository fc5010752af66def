"""The Hydra entry point as a user runs it (subprocess): help lists groups; --cfg job composes without a GPU."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_lists_the_config_groups():
    result = _train("--help")
    assert result.returncode == 0, result.stderr
    for line in ("stage: pretrain, sft, task_mix", "model: llama-7b, tiny", "data: billa, sample"):
        assert line in result.stdout


def test_7b_sft_on_8xa100_composes_zero3_bf16_without_a_gpu():
    result = _train("stage=sft", "model=llama-7b", "hardware=8xa100", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "stage: 3" in result.stdout and "precision: bf16-mixed" in result.stdout
    assert "bf16:\n        enabled: true" in result.stdout


def test_wrong_choice_lists_the_valid_options():
    result = _train("hardware=tpu-pod")
    assert result.returncode != 0
    assert "Could not find 'hardware/tpu-pod'" in result.stderr
    assert "8xa100" in result.stderr and "cpu" in result.stderr
