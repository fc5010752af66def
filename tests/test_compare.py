"""``billa.compare`` on hand-made ``pipeline.json`` files: mean +- std over seeds, the seed-spread mark, small
evaluation sets flagged, and the comparison sent to the sweep's W&B group as a ``comparison`` run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from billa.compare import log_comparison, write_comparison

# variant -> seed -> (text loss, dialogue loss, c3 accuracy). three_stage is best on text by far more than its seed
# spread; on dialogue merge_2_3's mean is within the spread of three_stage's; the C3 accuracies differ by 0.05 on 8
# items, which resolve an accuracy only to about +-0.35.
LOSSES = {
    "three_stage": {1: (2.00, 1.50, 0.50), 2: (2.02, 1.60, 0.50)},
    "merge_2_3": {1: (2.50, 1.52, 0.50), 2: (2.54, 1.62, 0.60)},
}


def _pipeline_json(directory: Path, variant: str, seed: int, text: float, dialogue: float, acc: float) -> None:
    stages = ["pretrain", "task_mix", "sft"] if variant == "three_stage" else ["pretrain", "merged_2_3"]
    steps = [{"step": "vocab"}] + [
        {"step": f"stage{i + 1}", "stage": stage, "reused": variant == "merge_2_3" and i == 0}
        for i, stage in enumerate(stages)
    ]
    directory.mkdir(parents=True)
    summary = {
        "pipeline": variant,
        "seed": seed,
        "steps": steps,
        "trained_steps": 3 * len(stages),
        "validation": {"by_kind": {"text": text, "instruction": dialogue}, "overall": (text + dialogue) / 2},
        "evaluation": {"c3": {"d/loglik/acc": acc, "d/items": 8}},
    }
    (directory / "pipeline.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path) -> Path:
    point = 0
    for seed in (1, 2):  # the order Hydra runs `pipeline=three_stage,merge_2_3 seed=1,2` in
        for variant, seeds in LOSSES.items():
            _pipeline_json(tmp_path / str(point), variant, seed, *seeds[seed])
            point += 1
    return tmp_path


def test_seeds_are_summarised_as_mean_and_std_per_variant(sweep):
    """Catches: seeds shown as separate variants, or a population std (ddof 0) where the sample std belongs."""
    result = write_comparison(sweep)
    text = result["summary"]["three_stage"]["validation/text"]
    assert text["n"] == 2 and text["mean"] == pytest.approx(2.01)
    assert text["std"] == pytest.approx(statistics.stdev([2.00, 2.02]))  # 0.01414, not 0.01
    assert [v["seed"] for v in result["variants"]] == [1, 1, 2, 2]
    table = (sweep / "comparison.md").read_text()
    assert "| three_stage | pretrain -> task_mix -> sft | 1, 2 |" in table  # one row per variant, its seeds listed
    assert f"2.0100 ± {statistics.stdev([2.00, 2.02]):.4f}" in table
    assert (sweep / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_differences_smaller_than_the_seed_spread_are_marked(sweep):
    """Catches: every difference reported as real (no mark), or the best variant / a clear winner marked."""
    result = write_comparison(sweep)
    summary = result["summary"]
    assert summary["merge_2_3"]["validation/instruction"]["within_seed_spread"]  # 1.57 vs 1.55, spread ~0.07
    assert not summary["three_stage"]["validation/instruction"]["within_seed_spread"]  # the best is never marked
    assert not summary["merge_2_3"]["validation/text"]["within_seed_spread"]  # 2.52 vs 2.01: a real difference
    spread = result["seed_spread"]["validation/instruction"]
    assert spread == pytest.approx(statistics.stdev([1.50, 1.60]))  # both variants vary by 0.1 over seeds
    validation_table = (sweep / "comparison.md").read_text().split("evaluate.py")[0]
    row = next(line for line in validation_table.splitlines() if line.startswith("| merge_2_3 |"))
    assert "| 1.5700 ± 0.0707 ~ | 2.5200 ± 0.0283 |" in row  # dialogue marked, LM text not


def test_an_evaluation_set_too_small_to_separate_variants_is_flagged(sweep):
    """Catches: a C3 accuracy difference on 8 items presented as a ranking, without its item count."""
    result = write_comparison(sweep)
    assert result["small_eval_sets"] == {"c3/d/loglik/acc": {"items": 8, "resolution": pytest.approx(8**-0.5)}}
    assert "c3/d/loglik/acc (n=8: too few items, ±0.35)" in (sweep / "comparison.md").read_text()


def test_one_seed_per_variant_shows_plain_values_and_no_marks(tmp_path):
    """Catches: a seed-spread mark (or a ± 0) drawn from a single seed, where no spread is known."""
    for point, (variant, seeds) in enumerate(LOSSES.items()):
        _pipeline_json(tmp_path / str(point), variant, 1, *seeds[1])
    result = write_comparison(tmp_path)
    assert all(spread is None for spread in result["seed_spread"].values())
    assert not any(s["within_seed_spread"] for v in result["summary"].values() for s in v.values())
    table = (tmp_path / "comparison.md").read_text()
    assert "±" not in table.split("evaluate.py")[0] and "~" not in table
    assert "| merge_2_3 | pretrain -> merged_2_3 | 1.5200 | 2.5000 | 2.0100 | 6 | stage1 |" in table


def test_the_comparison_goes_to_the_sweeps_wandb_group(sweep, monkeypatch):
    """Catches: the sweep's table and chart staying local under logger=wandb (no comparison run in the group)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    write_comparison(sweep)
    config = OmegaConf.create(
        {
            "logger": {"_target_": "billa.utils.loggers.wandb_logger", "project": "billa", "name": "x",
                       "save_dir": "/nonexistent", "group": None},
            "pipeline": {"group": None},
            "hydra": {"sweep": {"dir": str(sweep)}},
        }
    )  # fmt: skip
    log_comparison(config, sweep)
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].rglob("comparison/table_*.table.json")) and list(runs[0].rglob("comparison/chart_*.png"))
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # the run record (protobuf) holds group and job type
    assert f"sweep-{sweep.name}".encode() in record and b"comparison" in record
