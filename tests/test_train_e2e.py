"""End to end: billa.train.run on the tiny config in-process; the export loads and generates; val loss falls."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from billa.train import run

from .conftest import compose_train, tiny_parameter_count, train_in_process

TRAINED = [
    "trainer.max_steps=40",
    "val_every_n_steps=20",
    "scheduler.warmup_steps=5",
    "data.val_max_records=16",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_steps=10",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, sample_tokenizer_dir):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_train(
        [
            *TRAINED,
            "logger=csv",
            "hardware.peak_tflops=0.5",  # a made-up peak, so that MFU is logged on CPU
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
    assert [int(row["step"]) for row in throughput] == [9, 19, 29, 39]  # every 10 steps (log_every_n_steps)
    for row in throughput:  # MFU = tokens/s per device x FLOPs per token / peak (0.5 TFLOPS here)
        fpt = 6 * tiny_parameter_count(sample_tokenizer_dir) + 12 * 4 * 192 * 256  # 6N + 12 L h s at 256 tokens
        assert float(row["train/mfu"]) == pytest.approx(float(row["train/tokens_per_s_per_device"]) * fpt / 0.5e12)
        assert float(row["train/tokens_per_s"]) == float(row["train/tokens_per_s_per_device"]) > 0  # one device


def test_export_is_a_loadable_hf_directory_that_generates(trained):
    out, result = trained
    export = Path(result["export_dir"])
    files = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded
    # checkpoints every 10 steps, the last 2 kept with their manifests (size, SHA-256), plus the `last` link
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step=000030.ckpt",
        "step=000030.ckpt.manifest.json",
        "step=000040.ckpt",
        "step=000040.ckpt.manifest.json",
    ]
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.vocab_size == len(tokenizer) > 3000  # 1,000 English base pieces + the Chinese expansion
    inputs = tokenizer("老师，", return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(generated[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    assert text.startswith("老师，") and len(text) > len("老师，")  # the prompt, then generated text
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
    assert list((tmp_path / "tok").rglob("done.json")) and not (tmp_path / "checkpoints").exists()  # stream pieces


def test_checkpoint_carries_rng_state(trained, tmp_path):
    """The RNG state saved in a checkpoint is the state at save time: after loading, the draws continue exactly as
    they did after the save.

    Catches saving the wrong state (a fresh or fixed generator's) and restoring only part of it (torch, python or
    numpy): restoring the same saved state twice and comparing the two replays would not.
    """
    import random

    import numpy as np

    from billa.model.module import BillaLM

    out, _ = trained
    saved = torch.load(out / "checkpoints" / "step=000040.ckpt", map_location="cpu", weights_only=True)
    assert saved["billa_rng"]["torch"].dtype == torch.uint8 and saved["billa_rng"]["numpy"]["key"].shape == (624,)

    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.rand()

    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    draws()  # somewhere in the middle of a run
    checkpoint = {}
    BillaLM.on_save_checkpoint(None, checkpoint)
    after_save = draws()
    torch.save(checkpoint, tmp_path / "rng.ckpt")
    torch.manual_seed(0), random.seed(0), np.random.seed(0)  # a new process
    assert draws() != after_save
    BillaLM.on_load_checkpoint(None, torch.load(tmp_path / "rng.ckpt", weights_only=True))
    assert draws() == after_save


def test_ckpt_path_resumes_from_a_checkpoint_file_or_a_checkpoints_directory(trained, tmp_path, cache_dir):
    """README: ``ckpt_path`` names a checkpoint file or a directory of them (newest complete one).

    Resuming the 40-step run from its step-30 file reaches the uninterrupted run's final weights.
    """
    from billa.distributed.checkpoints import resolve_ckpt_path

    out, _ = trained
    checkpoints = out / "checkpoints"
    newest = str(checkpoints / "step=000040.ckpt")
    assert resolve_ckpt_path(str(checkpoints), None, tmp_path) == newest  # the checkpoints directory
    assert resolve_ckpt_path(str(out), None, tmp_path) == newest  # a run directory holding checkpoints/
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*not a complete checkpoint"):
        resolve_ckpt_path(str(tmp_path), None, tmp_path)
    cfg = compose_train(
        [
            *TRAINED,
            "logger=none",
            "validate_at_start=false",
            "export.verify=false",
            f"ckpt_path='{checkpoints / 'step=000030.ckpt'}'",  # quoted: '=' in a Hydra override value
        ],
        output_dir=tmp_path,
        cache=cache_dir,
    )
    result = run(cfg)
    assert result["resumed_from"].endswith("step=000030.ckpt") and result["global_step"] == 40
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    uninterrupted = AutoModelForCausalLM.from_pretrained(out / "hf").state_dict()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_skipped_records_are_reported_at_the_end_of_the_run(tmp_path, cache_dir, sample_corpus, caplog):
    """README: with ``data.on_error=skip`` malformed records are counted, logged and reported at the end of the run."""
    good = (sample_corpus / "pile" / "train" / "00000.jsonl").read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "pile_with_errors.jsonl"
    bad.write_text("\n".join([*good[:50], '{"text": "cut off', *good[50:], '{"meta": {}}']) + "\n", encoding="utf-8")
    cfg = compose_train(
        [
            "logger=none",
            "trainer.max_steps=2",
            "val_every_n_steps=2",
            "scheduler.warmup_steps=1",
            "data.val_max_records=4",
            "trainer.enable_progress_bar=false",
            "export.verify=false",
            "data.on_error=skip",
            f"data.sources.en.train={bad}",
            f"data.token_cache_dir={tmp_path / 'tok'}",
        ],
        output_dir=tmp_path,
        cache=cache_dir,
    )
    with caplog.at_level("INFO", logger="billa"):
        result = run(cfg)
    stats = result["data"]["en/train"]
    assert stats["skipped_malformed"] == 2 and stats["records"] == len(good) and result["global_step"] == 2
    report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Data report en/train")]
    assert len(report) == 1 and report[0].startswith(f"Data report en/train: {len(good)} records")
    assert "'skipped_malformed': 2" in report[0] and "pile_with_errors.jsonl" in report[0]


def test_resume_before_the_middle_of_the_run_continues_the_stream(tmp_path, cache_dir, sample_tokenizer_dir):
    """A run stopped after 2 of 8 steps and resumed with ``resume=auto`` logs the same losses for steps 3-8 as a run
    that never stopped.

    Bug caught: the resumed dataloader reporting only the batches left (6 steps) while Lightning restores the 2 done,
    so the epoch ended after step 4 and the next one replayed steps 3 and 4's data (step 5's loss 7.17 instead of
    7.30). Resumes past the middle hid it: the restored count already exceeded the shorter length."""
    from .conftest import logged

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_in_process(whole, cache_dir, "checkpoint.every_n_steps=2")
    train_in_process(parts, cache_dir, "checkpoint.every_n_steps=2", "stop_after_steps=2")
    result = train_in_process(parts, cache_dir, "checkpoint.every_n_steps=2", "resume=auto")
    assert result["resumed_from"] and result["global_step"] == 8
    expected, resumed = logged(whole, "train/loss"), logged(parts, "train/loss")
    assert sorted(resumed) == list(range(8))
    for step in range(2, 8):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step
