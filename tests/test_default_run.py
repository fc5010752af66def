"""The README's main job, as a user runs it: `python train.py` with no overrides (slow tier, ~3 minutes)."""

from __future__ import annotations

import csv
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from .helpers import run_door


@pytest.mark.slow
def test_python_train_py_with_no_overrides(tmp_path, cache_dir, sample_tokenizer_dir):
    env = {"BILLA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline"}
    result = run_door("train.py", f"hydra.run.dir={tmp_path}", "logger=csv", env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(next((tmp_path / "csv").rglob("metrics.csv")).open()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 5 and val[-1] < val[0] - 2.0  # steps 0, 100, 200, 300, 400
    assert json.loads((tmp_path / "export_check.json").read_text())["export_max_abs_logit_diff"] == 0.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    out = model.generate(**tokenizer("The weather", return_tensors="pt"), max_new_tokens=10, do_sample=False)
    assert len(tokenizer.decode(out[0], skip_special_tokens=True)) > len("The weather")
