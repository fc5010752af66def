"""DeepSpeed ZeRO-3 on CPU (2 processes over gloo, the real engine) through the real entry point.

One uninterrupted run of 8 steps with gradient accumulation (2 ranks x micro batch 4 x 2 accumulation, run D of
tests/test_equivalence.py); one run of the same schedule stopped after step 5; its resume to step 8.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from billa.distributed.checkpoints import find_resume_checkpoint

from .conftest import ZERO3, logged, tiny_parameter_count, train_cli
from .helpers import run_door

D = [*ZERO3, "hardware.micro_batch_size=4"]  # 16 = 4 x 2 ranks x 2 accumulation


def train(run_dir, cache_dir, *overrides: str) -> subprocess.CompletedProcess:
    return train_cli(run_dir, cache_dir, *D, *overrides)


@pytest.fixture(scope="module")
def full_run(zero3_accumulation_run):
    return zero3_accumulation_run


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
    """Each rank holds a shard from the moment the model is built; the whole model never materialises on a rank.

    Catches building the model outside the partitioning context (e.g. eagerly in ``__init__``, or
    ``deepspeed.zero.Init(enabled=False)``) and letting ``deepspeed.initialize`` partition it later: the report at
    the start of training looks the same, but ``at_build`` shows full tensors and a peak of the whole model.
    """
    reports = [json.loads((full_run / "partition" / f"rank{r}.json").read_text()) for r in (0, 1)]
    full = tiny_parameter_count(sample_tokenizer_dir)
    vocab = len(AutoTokenizer.from_pretrained(full_run / "hf"))
    for report in reports:
        assert report["world_size"] == 2
        assert report["empty_parameters"] == report["parameters"] == 39  # every tensor: numel() == 0
        assert report["local_numel"] == 0
        assert report["full_numel"] == full  # ds_numel: the full tiny model
        assert 0 < report["shard_numel"] < report["full_numel"]
        at_build = report["at_build"]
        assert at_build["empty_parameters"] == at_build["parameters"] == 39 and at_build["full_numel"] == full
        # parameters are partitioned module by module: the peak is the largest tensor (vocab x 192), not the model
        assert at_build["peak_materialised_numel"] == vocab * 192 < full / 4
    assert sum(r["shard_numel"] for r in reports) >= reports[0]["full_numel"]  # shards cover the model (+ padding)


def test_loss_falls(full_run):
    val = logged(full_run, "val/loss")
    assert sorted(val) == [0, 3, 7]
    assert val[7] < val[0] - 0.5, val
    assert sorted(logged(full_run, "train/loss")) == list(range(8))


def test_only_the_last_complete_checkpoint_directory_is_kept(full_run):
    """README: ``checkpoint.keep_last`` applies to ZeRO-3 checkpoint directories, and the COMPLETE marker is written
    after every rank's shard (a crash mid-save never leaves a directory that looks complete).

    Catches writing the marker before the shards (its mtime would precede theirs) and top-k deletion that leaves
    DeepSpeed directories behind.
    """
    checkpoints = full_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=000008.ckpt"]  # step 4: deleted
    final = checkpoints / "step=000008.ckpt"
    assert final.is_dir() and (checkpoints / "last.ckpt").resolve() == final.resolve()
    marker = final / "COMPLETE"
    assert marker.read_text() == "global_step=8\n"
    shards = [p for p in final.rglob("*") if p.is_file() and p != marker]
    assert {rank for rank in ("rank_0", "rank_1") if any(rank in p.name for p in shards)} == {"rank_0", "rank_1"}
    assert marker.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in shards)


def test_resume_reaches_the_same_losses(full_run, resumed_run):
    """Stopped after step 5 and resumed, with gradient accumulation 2: steps 6-8 see the same batches and weights.

    Catches a resume position that forgets accumulation (step x micro batch x ranks instead of step x global batch):
    the resumed run then replays half of the consumed samples and its losses after step 5 differ.
    """
    run_dir, result = resumed_run
    assert "Resuming from" in result.stderr + result.stdout and "step=000005.ckpt" in result.stderr + result.stdout
    uninterrupted, resumed = logged(full_run, "train/loss"), logged(run_dir, "train/loss")
    assert sorted(resumed) == list(range(8))
    for step in range(8):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6), (step, resumed, uninterrupted)
    assert logged(run_dir, "val/loss")[7] == pytest.approx(logged(full_run, "val/loss")[7], rel=1e-6)
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
    result = run_door("convert.py", "op=zero_to_hf", f"op.checkpoint={full_run / 'checkpoints'}", f"op.out_dir={out}")
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
