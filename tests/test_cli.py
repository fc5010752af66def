"""The Hydra entry point as a user runs it (subprocess): help lists groups; --cfg job composes without a GPU."""

from __future__ import annotations

import subprocess

from .helpers import run_door


def _train(*args: str) -> subprocess.CompletedProcess:
    return run_door("train.py", *args, timeout=120)


def test_help_lists_the_config_groups():
    result = _train("--help")
    assert result.returncode == 0, result.stderr
    for line in (
        "stage: merged_2_3, pretrain, sft, task_mix",
        "model: llama-7b, tiny",
        "data: billa, billa_repo, sample",
    ):
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


def test_multirun_sweep_writes_one_run_per_point(tmp_path, cache_dir, sample_tokenizer_dir):
    import json

    result = run_door(
        "train.py",
        "-m",
        "logger=csv",
        "trainer.max_steps=4,6",
        "val_every_n_steps=2",
        "scheduler.warmup_steps=1",
        "trainer.enable_progress_bar=false",
        "data.val_max_records=8",
        f"hydra.sweep.dir={tmp_path}",
        env={"BILLA_CACHE_DIR": str(cache_dir)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for point, steps in (("0", 4), ("1", 6)):
        run_dir = tmp_path / point
        assert json.loads((run_dir / "hf" / "config.json").read_text())["model_type"] == "llama"
        assert (run_dir / "checkpoints" / f"step={steps:06d}.ckpt").is_file()
