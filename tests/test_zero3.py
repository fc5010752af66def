"""DeepSpeed ZeRO-3 on CPU (2 processes over gloo, the real engine) through the real entry point.

One uninterrupted run of 8 steps; one run of the same schedule stopped after step 5; its resume to step 8.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from billa.distributed.checkpoints import find_resume_checkpoint

from .conftest import ROOT, tiny_parameter_count

COMMON = [
    "hardware=cpu_zero3",
    "logger=csv",
    "trainer.max_steps=8",
    "val_every_n_steps=4",
    "checkpoint.every_n_steps=4",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_steps=1",
    "data.val_max_records=8",
    "trainer.enable_progress_bar=false",
]


def train(run_dir: Path, cache_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BILLA_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "train.py", *COMMON, f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss per optimizer step (1-based) from every CSV version of the run."""
    out = {}
    for path in sorted((run_dir / "csv").rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):
                out[int(row["step"]) + 1] = float(row["train/loss"])
    return out


def val_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for path in sorted((run_dir / "csv").rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("val/loss"):
                out[int(row["step"])] = float(row["val/loss"])
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir, sample_tokenizer_dir):
    run_dir = tmp_path_factory.mktemp("zero3-full")
    train(run_dir, cache_dir)
    return run_dir


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, cache_dir, sample_tokenizer_dir):
    run_dir = tmp_path_factory.mktemp("zero3-resume")
    train(run_dir, cache_dir, "stop_after_steps=5")
    ckpts = run_dir / "checkpoints"
    assert find_resume_checkpoint(ckpts).endswith("step=000005.ckpt")
    # a save interrupted mid-way (no COMPLETE marker) and a leftover .partial directory, both "newer"
    shutil.copytree(ckpts / "step=000005.ckpt", ckpts / "step=000006.ckpt")
    (ckpts / "step=000006.ckpt" / "COMPLETE").unlink()
    shutil.copytree(ckpts / "step=000005.ckpt", ckpts / "step=000007.ckpt.partial")
    result = train(run_dir, cache_dir, "resume=auto")
    return run_dir, result


def test_parameters_are_partitioned(full_run, sample_tokenizer_dir):
    reports = [json.loads((full_run / "partition" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2
        assert report["empty_parameters"] == report["parameters"] == 39  # every tensor: numel() == 0
        assert report["local_numel"] == 0
        assert report["full_numel"] == tiny_parameter_count(sample_tokenizer_dir)  # ds_numel: the full tiny model
        assert 0 < report["shard_numel"] < report["full_numel"]
    assert sum(r["shard_numel"] for r in reports) >= reports[0]["full_numel"]  # shards cover the model (+ padding)


def test_loss_falls(full_run):
    val = val_losses(full_run)
    assert sorted(val) == [0, 3, 7]
    assert val[7] < val[0] - 0.5, val
    train_losses = losses(full_run)
    assert sorted(train_losses) == list(range(1, 9))


def test_resume_reaches_the_same_losses(full_run, resumed_run):
    run_dir, result = resumed_run
    assert "Resuming from" in result.stderr + result.stdout and "step=000005.ckpt" in result.stderr + result.stdout
    uninterrupted, resumed = losses(full_run), losses(run_dir)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), (step, resumed, uninterrupted)
    assert find_resume_checkpoint(run_dir / "checkpoints").endswith("step=000008.ckpt")


def test_export_loads_and_matches_the_trained_model(full_run, sample_tokenizer_dir):
    check = json.loads((full_run / "export_check.json").read_text())
    assert check["export_max_abs_logit_diff"] == 0.0  # gathered ZeRO-3 model vs reloaded export, same batch
    export = full_run / "hf"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) == tiny_parameter_count(sample_tokenizer_dir)
    assert all(p.abs().sum() > 0 for p in model.parameters())  # nothing exported empty or zero


def test_convert_zero3_checkpoint_to_hf(full_run, tmp_path):
    out = tmp_path / "converted"
    result = subprocess.run(
        [
            sys.executable,
            "convert.py",
            "op=zero_to_hf",
            f"op.checkpoint={full_run / 'checkpoints'}",
            f"op.out_dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    converted = load_file(out / "model.safetensors")
    exported = load_file(full_run / "hf" / "model.safetensors")
    assert set(converted) == set(exported)
    for name, tensor in exported.items():
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0, msg=name)
    assert (out / "tokenizer.model").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(AutoTokenizer.from_pretrained(out))


def test_pretrained_weights_load_into_partitioned_parameters(full_run, tmp_path, cache_dir):
    """init_from a HF directory under ZeRO-3: with lr=0 one step later the export equals the loaded weights."""
    run_dir = tmp_path / "init"
    train(
        run_dir,
        cache_dir,
        f"init_from={full_run / 'hf'}",
        "optimizer.lr=0.0",
        "trainer.max_steps=2",
        "stop_after_steps=1",
        "validate_at_start=false",
    )
    loaded = load_file(run_dir / "hf" / "model.safetensors")
    source = load_file(full_run / "hf" / "model.safetensors")
    assert set(loaded) == set(source)
    for name, tensor in source.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    report = json.loads((run_dir / "partition" / "rank0.json").read_text())
    assert report["empty_parameters"] == report["parameters"]  # loaded straight into partitioned parameters
