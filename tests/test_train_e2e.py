"""End to end: billa.train.run on the tiny config in-process; the export loads and generates; val loss falls."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from billa.train import run

from .conftest import compose_train, tiny_parameter_count


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, sample_tokenizer_dir):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_train(
        [
            "logger=csv",
            "trainer.max_steps=40",
            "val_every_n_steps=20",
            "scheduler.warmup_steps=5",
            "data.val_max_records=16",
            "trainer.enable_progress_bar=false",
            "hardware.peak_tflops=0.5",  # a made-up peak, so that MFU is logged on CPU
            "checkpoint.every_n_steps=10",
            "checkpoint.keep_last=2",
            "export.max_shard_size=5MB",  # the tiny model in several safetensors shards + index
        ],
        output_dir=out,
        cache=cache_dir,
    )
    return out, run(cfg)


def test_validation_loss_falls_below_step_zero(trained, sample_tokenizer_dir):
    out, result = trained
    assert result["global_step"] == 40
    assert result["val_loss_start"] > result["val_loss"] + 0.5, result
    metrics = list(csv.DictReader(next((out / "csv").rglob("metrics.csv")).open()))
    val = [(int(row["step"]), float(row["val/loss"])) for row in metrics if row.get("val/loss")]
    assert val[0][0] == 0 and val[0][1] == pytest.approx(result["val_loss_start"])
    assert [step for step, _ in val[1:]] == [19, 39]  # Lightning logs at the last batch of steps 20 and 40
    last = [row for row in metrics if row.get("train/mix/zh")][-1]  # the realised 4:4:2 mix, logged per source
    assert float(last["train/mix/zh"]) == pytest.approx(0.4, abs=0.01)
    assert float(last["train/mix/translate"]) == pytest.approx(0.2, abs=0.01)
    assert (
        float(last["train/samples/zh"]) + float(last["train/samples/en"]) + float(last["train/samples/translate"])
        == int(last["step"]) * 16 + 16
    )  # every sample of steps 1..N counted once
    assert float(last["train/tokens/zh"]) > float(last["train/samples/zh"])
    throughput = [row for row in metrics if row.get("train/tokens_per_s")]
    assert throughput
    for row in throughput:  # MFU = tokens/s per device x FLOPs per token / peak (0.5 TFLOPS here)
        fpt = 6 * tiny_parameter_count(sample_tokenizer_dir) + 12 * 4 * 192 * 256  # 6N + 12 L h s at 256 tokens
        assert float(row["train/mfu"]) == pytest.approx(float(row["train/tokens_per_s_per_device"]) * fpt / 0.5e12)


def test_export_is_a_loadable_hf_directory_that_generates(trained):
    out, result = trained
    export = Path(result["export_dir"])
    files = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded
    # checkpoints every 10 steps, the last 2 kept, plus the `last` link
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step=000030.ckpt",
        "step=000040.ckpt",
    ]
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.vocab_size == len(tokenizer) > 3000  # 1,000 English base pieces + the Chinese expansion
    inputs = tokenizer("老师，", return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)
    # the export holds the trained weights: bit-identical to the final Lightning checkpoint's
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained_state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    exported = model.state_dict()
    assert checkpoint["global_step"] == 40
    assert set(trained_state) == set(exported)
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, trained_state[name], rtol=0, atol=0, msg=name)


def test_packed_layout_trains(tmp_path, cache_dir, sample_tokenizer_dir):
    cfg = compose_train(
        [
            "logger=none",
            "trainer.max_steps=20",
            "val_every_n_steps=20",
            "scheduler.warmup_steps=2",
            "data.layout=pack",
            "data.val_max_records=16",
            "trainer.enable_progress_bar=false",
            "export.verify=false",
        ],
        output_dir=tmp_path,
        cache=cache_dir,
    )
    result = run(cfg)
    assert result["global_step"] == 20
    assert result["val_loss"] < result["val_loss_start"] - 0.5


def test_prepare_only_tokenises_without_training(tmp_path, cache_dir, sample_tokenizer_dir):
    cfg = compose_train(
        ["prepare_only=true", f"data.token_cache_dir={tmp_path / 'tok'}"], output_dir=tmp_path, cache=cache_dir
    )
    result = run(cfg)
    assert set(result["data"]) == {"zh/train", "zh/val", "en/train", "en/val", "translate/train", "translate/val"}
    assert result["data"]["zh/train"]["examples"] == result["data"]["zh/train"]["records"] > 400
    assert list((tmp_path / "tok").rglob("billa_shard.json")) and not (tmp_path / "checkpoints").exists()


def test_checkpoint_carries_rng_state(trained):
    import random

    import numpy as np

    out, _ = trained
    checkpoint = torch.load(out / "checkpoints" / "step=000040.ckpt", map_location="cpu", weights_only=True)
    rng = checkpoint["billa_rng"]
    assert rng["torch"].dtype == torch.uint8 and rng["numpy"]["key"].shape == (624,)
    from billa.model.module import BillaLM

    before = (torch.rand(3), random.random(), np.random.rand())
    BillaLM.on_load_checkpoint(None, checkpoint)
    restored = (torch.rand(3), random.random(), np.random.rand())
    BillaLM.on_load_checkpoint(None, checkpoint)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(restored[0], again[0]) and restored[1:] == again[1:]  # the saved state, replayed exactly
    assert not torch.equal(before[0], restored[0]) or before[1:] != restored[1:]
