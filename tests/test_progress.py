"""Progress in job logs and on terminals: text lines per N optimizer steps and per validation; a step-counting bar."""

from __future__ import annotations

import csv
import logging
import re
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from billa.progress import TextProgress, format_duration, progress_callbacks, track

from .helpers import quiet_trainer, run_door

STEP_LINE = re.compile(
    r"step (\d+)/(\d+) \((\d+\.\d)%\) \| loss (\d+\.\d+) \| lr (\S+) \| ([\d,]+) tok/s \| "
    r"elapsed (\d+:\d\d:\d\d) \| ETA (\d+:\d\d:\d\d)"
)
VAL_LINE = re.compile(r"validation at step (\d+)/(\d+): val/loss (\S+) \| val/ppl (\S+)")


class _Values(IterableDataset):
    """Micro batches whose loss is known: batch i (from 1) has loss i. No ``__len__``, like billa's stream."""

    def __iter__(self):
        for i in range(1, 1000):
            yield {"input_ids": torch.ones(4, dtype=torch.long), "value": torch.tensor(float(i))}


class _KnownLoss(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.step_values: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = (self.w * 0).sum() + batch["value"].mean()  # the batch's value, with a graph
        self.step_values.append(float(batch["value"]))
        if not self.trainer.fit_loop._should_accumulate():  # like BillaLM: the whole step's loss, once per step
            self.log("train/loss", sum(self.step_values) / len(self.step_values))
            self.step_values = []
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(_Values(), batch_size=1)


def _fit(tmp_path, callbacks, enable_progress_bar: bool, max_steps: int = 5, accumulate: int = 2) -> L.Trainer:
    trainer = quiet_trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        enable_progress_bar=enable_progress_bar,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(_KnownLoss())
    return trainer


def test_text_lines_count_optimizer_steps_and_average_the_loss(tmp_path, caplog):
    """Catches lines per micro batch instead of per optimizer step, a loss that is one micro batch's (or scaled by
    the accumulation), a missing line at the last step, and wrong step/total or percentage."""
    caplog.set_level(logging.INFO, logger="billa.progress")
    _fit(tmp_path, [TextProgress(every_n_steps=2)], enable_progress_bar=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "billa.progress"]
    steps = [STEP_LINE.search(line) for line in lines]
    assert all(steps), lines
    assert [(m[1], m[2], m[3]) for m in steps] == [("2", "5", "40.0"), ("4", "5", "80.0"), ("5", "5", "100.0")]
    # accumulation 2: step k holds micro batches 2k-1, 2k (losses = their index); a line averages its steps
    assert [float(m[4]) for m in steps] == [2.5, 6.5, 9.5]  # (1+2+3+4)/4, (5+6+7+8)/4, (9+10)/2
    assert [float(m[5]) for m in steps] == [0.5, 0.5, 0.5]  # SGD, constant lr
    assert int(steps[0][6].replace(",", "")) > 0  # 4 tokens per micro batch
    assert steps[-1][8] == "0:00:00"  # nothing left at the last step


def test_bar_counts_the_schedule_steps_not_epochs(tmp_path, capsys):
    """Catches Lightning's default bar ("Epoch 0/-2", counting micro batches of an unknown epoch) coming back, and a
    bar that counts micro batches instead of optimizer steps."""
    callbacks, enabled = progress_callbacks("bar", 10, True, "pretrain")
    assert enabled and len(callbacks) == 1
    _fit(tmp_path, callbacks, enable_progress_bar=True, max_steps=6, accumulate=3)
    out = capsys.readouterr().out
    assert "pretrain: 100%" in out and "6/6" in out, out[-500:]
    assert "Epoch" not in out and "18/" not in out  # 18 micro batches, 6 optimizer steps


def test_modes(monkeypatch):
    """Catches ``auto`` drawing a bar into a file or pipe, and a bar forced on with enable_progress_bar=false."""
    callbacks, enabled = progress_callbacks("auto", 5, True)  # pytest captures stdout: not a terminal
    assert [type(c).__name__ for c in callbacks] == ["TextProgress"] and not enabled
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    callbacks, enabled = progress_callbacks("auto", 5, True)
    assert [type(c).__name__ for c in callbacks] == ["StepProgressBar"] and enabled
    assert progress_callbacks("bar", 5, False) == ([], False)
    assert progress_callbacks("none", 5, True) == ([], False)
    with pytest.raises(ValueError, match="`progress`='verbose'"):
        progress_callbacks("verbose", 5, True)


def test_track_logs_progress_and_the_end(caplog):
    """Catches a silent loop in job logs (no final line) and a wrong count or percentage."""
    caplog.set_level(logging.INFO, logger="billa.progress")
    assert list(track(range(3), desc="tokenising zh.train", unit="files", every_s=3600)) == [0, 1, 2]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("tokenising zh.train: 3/3 files (100.0%) | elapsed 0:00:00")
    caplog.clear()
    list(track(iter(range(4)), total=8, desc="eval", every_s=0))  # every item; ended early: a last line too
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" |")[0] for line in lines] == [f"eval: {i}/8 it ({12.5 * i:.1f}%)" for i in (1, 2, 3, 4)] + [
        "eval: 4/8 it (50.0%)"
    ]


def test_format_duration():
    assert format_duration(3725) == "1:02:05"
    assert format_duration(90061) == "1d 1:01:01"
    assert format_duration(float("inf")) == "?"


def test_redirected_run_logs_steps_validations_and_tokenisation(tmp_path, cache_dir, sample_tokenizer_dir):
    """A real `python train.py` with stdout and stderr going to a pipe, as under SLURM.

    Catches the silent job log of the issue: no step lines until the end (a bar drawn only at exit), validation
    results missing from the log, the tokenisation pass without progress, and "Epoch 0/-2"; and a model card that
    misses the stage, the mix or the command, or leaks a secret from the command line.
    """
    run_dir = tmp_path / "run"
    result = run_door(
        "train.py",
        "logger=csv",
        "trainer.max_steps=6",
        "val_every_n_steps=3",
        "trainer.log_every_n_steps=2",
        "scheduler.warmup_steps=1",
        "data.val_max_records=8",
        "export.verify=false",
        f"data.token_cache_dir={tmp_path / 'tokens'}",  # a fresh cache: the tokenisation pass runs
        f"hydra.run.dir={run_dir}",
        "+openai_api_key=sk-not-for-the-card",  # a secret given on the command line
        env={"BILLA_CACHE_DIR": str(cache_dir)},
        merge_output=True,
    )
    log = result.stdout
    assert result.returncode == 0, log[-3000:]
    steps = [m.groups() for m in STEP_LINE.finditer(log)]
    assert [(s[0], s[1], s[2]) for s in steps] == [("2", "6", "33.3"), ("4", "6", "66.7"), ("6", "6", "100.0")]
    vals = {int(m[1]): float(m[3]) for m in VAL_LINE.finditer(log)}
    assert sorted(vals) == [0, 3, 6], log[-3000:]
    logged = [r for r in csv.DictReader(next(run_dir.rglob("metrics.csv")).open()) if r.get("val/loss")]
    assert [float(r["val/loss"]) for r in logged] == pytest.approx([vals[0], vals[3], vals[6]], rel=1e-3)
    for name in ("zh", "en", "translate"):  # stream sources: one line per file the feeder finished
        assert re.search(rf"tokenised {name}: 0000\d\.jsonl? \(file \d+ of 10, 1 pieces, \d+ examples\)", log), name
    assert "Epoch" not in log
    # the export of the same run: its model card names the stage, the realised mix and the command
    card = (run_dir / "hf" / "README.md").read_text(encoding="utf-8")
    assert "stage=pretrain" in card and "- stage:pretrain" not in card  # tags are quoted YAML strings
    assert '- "stage:pretrain"' in card
    for source, weight in (("zh", 4), ("en", 4), ("translate", 2)):
        assert re.search(rf"\| `{source}` \| {weight} \| \d+ \| \d\d\.\d% \| [\d,]+ \|", card), card
    assert "python train.py logger=csv trainer.max_steps=6 val_every_n_steps=3" in card
    assert "+openai_api_key=***" in card and "sk-not-for-the-card" not in card
    assert f"| `val/loss` | {vals[6]:.4g} |" in card
