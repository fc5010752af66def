"""W&B: the run naming scheme, the `wandb sync` command, and the saved view (billa.dashboard) against real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from billa.dashboard import (
    build_spec,
    data_sources,
    eval_subsets,
    logged_keys,
    panel_keys,
    read_histories,
    to_workspace,
    view_name,
)
from billa.utils.loggers import pipeline_run_dirs, run_identity, sync_command

from .conftest import ROOT


def test_run_identity_names_stage_model_variant_and_seed():
    """Catches a scheme that drops the variant (three ablation variants' runs all called `sft-tiny`)."""
    stage = run_identity("sft", "tiny", variant="merge_2_3", seed=7, hardware="1x8xgpu", seed_in_name=True)
    assert stage.name == "sft-tiny-merge_2_3-s7" and stage.job_type == "sft"
    assert stage.tags == ["model:tiny", "stage:sft", "variant:merge_2_3", "hw:1x8xgpu", "seed:7"]
    single = run_identity("pretrain", "tiny", variant="none", seed=42)
    assert single.name == "pretrain-tiny" and "variant:none" not in single.tags
    assert run_identity("eval", "tiny", tasks=["val_loss", "ppl"]).job_type == "eval-val_loss+ppl"


def test_sync_command_covers_every_offline_run_of_a_pipeline(tmp_path):
    """Catches a command that misses stage runs kept in the stage store (outside the pipeline's directory)."""
    store, run = tmp_path / "stages", tmp_path / "run"
    for d in (store / "stage1-a", store / "stage2-b", run / "eval"):
        (d / "wandb" / "offline-run-20260101_000000-x").mkdir(parents=True)
    steps = [{"step": "vocab"}, {"stage": "pretrain", "dir": str(store / "stage1-a")},
             {"stage": "sft", "dir": str(store / "stage2-b")}]  # fmt: skip
    (run / "pipeline.json").write_text(json.dumps({"steps": steps}))
    command = sync_command(pipeline_run_dirs(run))
    assert command == (
        f"wandb sync {run}/eval/wandb/offline-run-* {store}/stage1-a/wandb/offline-run-* "
        f"{store}/stage2-b/wandb/offline-run-*"
    )
    assert sync_command(pipeline_run_dirs(tmp_path / "empty")) is None


def test_view_is_built_offline_with_a_section_per_question():
    """Catches a spec the wandb_workspaces objects reject, or a sweep view that lost its ablation section."""
    spec = build_spec(data_sources(), eval_subsets(), group="sweep-x", comparison="| three_stage |")
    names = [s["name"] for s in spec["sections"]]
    assert names[0] == "Loss by source kind" and names[-1] == "Ablation: variants side by side"
    assert {"val/loss/zh", "train/mix/translate", "val_loss/kind/instruction/loss", "c3/d/loglik/acc"} <= panel_keys(
        spec
    )
    view = to_workspace(spec)._to_model()  # what .save() uploads, built without network
    assert view.display_name == "billa: sweep-x" and len(view.spec.section.panel_bank_config.sections) == len(names)
    assert "view" not in {s["name"] for s in build_spec(data_sources(), {}, group=None)["sections"]}


def test_saving_the_same_view_again_updates_it():
    """Catches a view saved under a fresh random name each time (W&B's default), so every run of billa.dashboard
    would add another copy of the project's or sweep's workspace instead of updating it."""
    spec = build_spec(data_sources(), eval_subsets(), group="sweep-x")
    again = build_spec(data_sources(), eval_subsets(), group="sweep-x")
    other = build_spec(data_sources(), eval_subsets(), group="sweep-y")
    assert view_name(spec) == view_name(again) != view_name(other)
    assert view_name(spec).startswith("nw-") and view_name(spec).endswith("-v") and "-v" not in view_name(spec)[3:-2]
    workspace = to_workspace(spec)
    workspace._internal_name = view_name(spec)
    assert workspace._to_model().name == view_name(spec)  # the name the upsert sends


@pytest.mark.slow
def test_every_panel_key_is_in_the_history_of_a_real_offline_pipeline(tmp_path, cache_dir, sample_tokenizer_dir):
    """Catches a renamed metric (in training, validation or evaluate.py) that would leave a dashboard panel empty,
    and stages logging into one W&B run (each stage and the evaluation must be their own named run)."""
    env = {**os.environ, "BILLA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    quick = ["trainer.max_steps=2", "val_every_n_steps=2", "checkpoint.every_n_steps=2", "scheduler.warmup_steps=1",
             "data.val_max_records=4", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "train.py", "pipeline=three_stage", "logger=wandb", *quick,
         "pipeline.evaluate_tasks=[ppl,logiqa2,c3]", f"pipeline.store_dir={tmp_path / 'stages'}",
         f"hydra.run.dir={tmp_path / 'run'}"],  # fmt: skip
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    histories = read_histories(pipeline_run_dirs(tmp_path / "run"))
    assert set(histories) == {f"{s}-tiny-three_stage" for s in ("pretrain", "task_mix", "sft", "eval")}
    spec = build_spec(data_sources(), eval_subsets(), group="g")  # the sweep view: the ablation section too
    missing = panel_keys(spec) - logged_keys(histories) - set(spec["conditional_keys"])
    assert not missing, sorted(missing)
    assert "wandb sync " in result.stdout + result.stderr
