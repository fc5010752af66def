"""The figures a run logs beside the loss (model FLOP rate, step-time split, mix error), in the run directory's
``metrics.csv`` with ``logger=none`` as with ``logger=csv``: one real 8-step run of the tiny default."""

from __future__ import annotations

import csv

import pytest

from .conftest import tiny_parameter_count, train_in_process

MIX = {"zh": 4, "en": 4, "translate": 2}  # conf/stage/pretrain.yaml's round-robin weights
PEAK_TFLOPS = 0.5  # a made-up device peak, so that MFU is logged on CPU


@pytest.fixture(scope="module")
def rows(tmp_path_factory, cache_dir, sample_tokenizer_dir) -> list[dict]:
    """The training rows of ``metrics.csv`` of an 8-step run with ``logger=none``, logging every step."""
    out = tmp_path_factory.mktemp("metrics-none")
    train_in_process(out, cache_dir, "logger=none", f"hardware.peak_tflops={PEAK_TFLOPS}")
    files = list((out / "csv").rglob("metrics.csv"))
    assert len(files) == 1, "logger=none must still write <output_dir>/csv/version_N/metrics.csv"
    return [row for row in csv.DictReader(files[0].open()) if row.get("train/tokens_per_s")]


def test_logger_none_keeps_every_figure_in_metrics_csv(rows):
    """Catches: logger=none dropping the run's metrics (no file), or a key of the panels never logged."""
    assert [int(row["step"]) for row in rows] == list(range(8))  # trainer.log_every_n_steps=1
    keys = {"train/loss", "train/lr", "train/grad_norm", "train/tflops_per_device", "train/mfu"}
    keys |= {f"train/step_time/{kind}" for kind in ("data", "compute", "optimizer")}
    keys |= {f"train/{what}/{source}" for what in ("mix", "mix_error", "tokens", "samples") for source in MIX}
    missing = {key for key in keys if not all(row.get(key) for row in rows)}
    assert not missing


def test_tflops_are_tokens_per_second_times_flops_per_token(rows, sample_tokenizer_dir):
    """Catches: a FLOP rate off by a unit (GFLOP/TFLOP) or computed from another token count than the rate's."""
    fpt = 6 * tiny_parameter_count(sample_tokenizer_dir) + 12 * 4 * 192 * 256  # 6N + 12 L h s at 256 tokens
    for row in rows:
        achieved = float(row["train/tokens_per_s_per_device"]) * fpt
        assert float(row["train/tflops_per_device"]) == pytest.approx(achieved / 1e12, rel=1e-5)
        assert float(row["train/mfu"]) == pytest.approx(achieved / (PEAK_TFLOPS * 1e12), rel=1e-5)


def test_mix_error_is_realised_minus_configured_share_and_small_on_round_robin(rows):
    """Catches: a mix error against the wrong target (raw weights, or another source's share), or one that grows
    although round robin draws the exact 4:4:2 cycle (at most a part-cycle, 4 samples, off)."""
    for row in rows:
        samples = sum(float(row[f"train/samples/{source}"]) for source in MIX)
        for source, weight in MIX.items():
            error = float(row[f"train/mix_error/{source}"])
            assert error == pytest.approx(float(row[f"train/mix/{source}"]) - weight / sum(MIX.values()), abs=1e-6)
            assert abs(error) <= max(MIX.values()) / samples
    assert float(rows[-1]["train/mix_error/translate"]) == pytest.approx(0.0, abs=0.02)


def test_step_times_are_positive_and_fit_in_the_run(rows):
    """Catches: a step-time split that counts an interval twice (data + compute over the same micro batch), or one
    that counts the validation at step 4 as a data wait: over the run the three parts must add up to less than the
    steps' wall time, which the token rate gives (tokens of the step / tokens per second) and includes validation."""
    previous_tokens, wall, split = 0.0, 0.0, 0.0
    for row in rows:
        parts = [float(row[f"train/step_time/{kind}"]) for kind in ("data", "compute", "optimizer")]
        assert parts[0] >= 0 and parts[1] > 0 and parts[2] > 0
        tokens = sum(float(row[f"train/tokens/{source}"]) for source in MIX)  # cumulative: this step's is the change
        wall += (tokens - previous_tokens) / float(row["train/tokens_per_s_per_device"])  # seconds of this step
        previous_tokens, split = tokens, split + sum(parts)
    assert 0.5 * wall < split <= wall  # per step the two callbacks' windows differ by microseconds; over a run, no
