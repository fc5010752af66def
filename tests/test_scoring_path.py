"""One scoring path: training's validation and ``evaluate.py task=val_loss`` build the same data module from the same
config and score it with the same function, so they agree per source on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import compose_train, train_in_process


def _with_a_malformed_record(src: Path, dst: Path) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join([lines[0], '{"en_text": "cut off', *lines[1:]]) + "\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory, cache_dir, sample_tokenizer_dir, sample_corpus):
    """Stage 2 (translation with its extra newline) for 2 steps, a malformed translation val record skipped."""
    out = tmp_path_factory.mktemp("scoring")
    val = _with_a_malformed_record(sample_corpus / "translation" / "val.jsonl", out / "translate-val.jsonl")
    data = ["stage=task_mix", "data.on_error=skip", f"data.sources.translate.val={val}", "data.val_max_records=6"]
    run = [*data, "trainer.max_steps=2", "val_every_n_steps=2", "checkpoint.every_n_steps=2", "validate_at_start=false"]
    result = train_in_process(out / "run", cache_dir, *run)
    return out, data, result


def test_training_validation_and_the_val_loss_task_agree_per_source(stage2_run, cache_dir):
    """The per-source loss of ``evaluate.py task=val_loss`` on the export equals training's last ``val/loss/<source>``
    to 1e-6, for a stage-2 config with ``data.on_error=skip`` and a malformed validation record.

    Bugs caught: a second, hand-built data module that drifts from training's (the pipeline's old scorer never passed
    ``on_error``, so it raised on the record training skipped, and scored stage-2 translation without its newline);
    a second NLL implementation (row-weighted means, a different label shift).
    """
    from billa.evaluate import run as evaluate

    out, data, result = stage2_run
    assert result["data"]["translate/val"]["skipped_malformed"] == 1  # the bad record was there, and skipped
    cfg = _evaluate_config(["task=val_loss", "logger=none", f"model_path={result['export_dir']}"], out, cache_dir)
    cfg.task.val_loss.overrides = data
    summary = evaluate(cfg)
    details = json.loads((Path(summary["output_dir"]) / "val_loss.json").read_text())["details"]
    mix = compose_train(data).data.mix
    trained = {name: result["metrics"][f"val/loss/{name}"] for name in mix}
    scored = {name: details["by_source"][name]["loss"] for name in mix}
    assert set(trained) == set(mix) and len(mix) == 13
    for name in mix:
        assert scored[name] == pytest.approx(trained[name], abs=1e-6), name
    assert details["by_kind"].keys() == {"text", "translation", "task", "instruction"}


def _evaluate_config(overrides: list[str], out: Path, cache_dir: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from .conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out / "eval")
        cfg.cache_dir = str(cache_dir)
    return cfg
