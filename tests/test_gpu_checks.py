"""benchmarks/gpu_checks.sh's ``recipe`` step (benchmarks/recipe_gpu.py) and scripts/wheelhouse.sh, checked on CPU."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT


def _recipe_gpu():
    spec = importlib.util.spec_from_file_location("recipe_gpu", ROOT / "benchmarks" / "recipe_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layers_that_fit_follow_memory_devices_and_disk():
    """Bug caught: a layer rule that ignores the GPU count (ZeRO-3 splits the states over them), mixes GiB and bytes,
    or forgets the disk (a 7B-shaped ZeRO-3 checkpoint is 14 bytes a parameter: a deep stack fills the disk of the
    GPU machine at its first checkpoint), or that asks for more than LLaMA-7B's 32 layers or for none."""
    fit = _recipe_gpu().fitting_layers
    assert fit(80, 8, 10_000) == 32  # 8 x A100 80GB, a large disk: the whole 7B
    one, two = fit(80, 1, 10_000), fit(80, 2, 10_000)
    assert 10 <= one < two <= 32  # 80 GB x 1 holds ~4B parameters' states: 17 layers; 2 x 80 GB: 32
    assert fit(139, 1, 50) < fit(139, 1, 10_000)  # 50 GiB of disk: ~1.2B parameters in all, 3 layers
    assert 2 <= fit(139, 1, 50) <= 5
    assert fit(16, 1, 10_000) == 1  # never 0 or negative


def test_wheelhouse_refuses_a_missing_have_file(tmp_path):
    """Bug caught: a mistyped ``--have`` path silently ignored, so the wheelhouse brings every package the target
    already has (pyarrow, pandas, matplotlib...) and no longer fits the 64 MiB a working tree may carry."""
    result = subprocess.run(
        ["bash", "scripts/wheelhouse.sh", str(tmp_path / "wh"), "--have", str(tmp_path / "nope.txt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "billa: error: --have" in result.stderr and "nope.txt" in result.stderr


@pytest.mark.slow
def test_recipe_step_smoke_runs_three_stages_with_kill_resume_and_export_check(
    cache_dir, sample_tokenizer_dir, tmp_path
):
    """Bug caught: the GPU check's ``recipe`` step broken where no GPU test would see it until a GPU is lent: a stage
    whose overrides the config refuses, stage 2/3 not chained to the previous export (``init_from``), a SIGKILL
    that leaves no resumable checkpoint or a ``resume=auto`` that trains step 1 again, an export that is not the
    live model, or a table without tokens/s for a stage. Runs ``SMOKE=1 bash benchmarks/gpu_checks.sh OUT recipe``:
    the same ``python train.py`` commands on 2 ZeRO-3 CPU processes at toy sizes."""
    out = tmp_path / "gc"
    env = {
        **os.environ,
        "SMOKE": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the script's python3: this interpreter
        "BILLA_CACHE_DIR": str(cache_dir),
        "PYTHONWARNINGS": "ignore",
        "WANDB_MODE": "offline",
    }
    result = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", str(out), "recipe"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    text = (out / "recipe.txt").read_text()
    assert result.returncode == 0 and "== recipe: exit 0" in text, text[-4000:] + result.stderr[-2000:]
    table = text[text.index("stage ") :].splitlines()
    rows = {line.split()[0]: line.split() for line in table[1:4]}
    assert list(rows) == ["pretrain", "task_mix", "sft"]
    assert all(float(row[1]) > 0 for row in rows.values())  # tokens/s of every stage
    recipe = out / "recipe"
    stage1_log = (recipe / "pretrain.log").read_text()
    assert "killed with SIGKILL after step=000001.ckpt" in stage1_log
    assert "Resuming from" in stage1_log and "step=000001.ckpt" in stage1_log
    versions = sorted((recipe / "pretrain" / "csv").rglob("metrics.csv"), key=lambda p: p.parent.name)
    resumed = [int(row["step"]) for row in csv.DictReader(versions[-1].open()) if row.get("train/loss")]
    assert resumed == [1, 2]  # optimizer steps 2 and 3 (CSV step = step - 1): step 1 came from the checkpoint
    summary = json.loads((recipe / "recipe.json").read_text())
    for stage in ("pretrain", "task_mix", "sft"):
        assert summary["stages"][stage]["export_max_abs_logit_diff"] <= 1e-5  # the export is the live model
        assert summary["stages"][stage]["train/tokens_per_s"] > 0
    assert (
        "init_from=" + str(recipe / "pretrain" / "hf") in text
        and "init_from=" + str(recipe / "task_mix" / "hf") in text
    )
