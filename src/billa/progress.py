"""Progress that reads well both on a terminal and in a job log (SLURM, ``nohup``, ``| tee``).

On a terminal a bar counts the optimizer steps of the schedule (``trainer.max_steps``); when stdout is not a terminal
a bar would only draw at the end, so rank 0 writes one text line every ``log_every_n_steps`` optimizer steps instead::

    step 120/400 (30.0%) | loss 3.412 | lr 1.96e-03 | 12,345 tok/s | elapsed 0:01:02 | ETA 0:02:24
    validation at step 200/400: val/loss 3.101 | val/ppl 22.2

``track`` does the same for any other long loop (tokenisation, evaluation): a tqdm bar on a terminal, a line at most
every ``every_s`` seconds and one at the end otherwise.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

from billa.utils.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")
MODES = ("auto", "bar", "text", "none")


def is_interactive() -> bool:
    """True when stdout is a terminal (a bar can redraw in place); False under SLURM, ``nohup`` or a pipe."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``bar`` on a terminal, ``text`` otherwise; other modes are checked and returned as they are."""
    if mode not in MODES:
        raise ValueError(f"`progress`={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "bar" if is_interactive() else "text"
    return mode


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``Dd H:MM:SS`` from one day on); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def _fmt_metric(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _current_lr(trainer: L.Trainer) -> float | None:
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (IndexError, KeyError, AttributeError):
        return None


def _batch_tokens(batch) -> int:
    """Non-padding input tokens of a batch (``sample_tokens`` from billa's collators, else the attention mask)."""
    if isinstance(batch, dict):
        if "sample_tokens" in batch:
            return int(sum(batch["sample_tokens"]))
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return int(mask.sum())
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return ids.numel()
    return 0


class TextProgress(L.Callback):
    """One log line per ``every_n_steps`` optimizer steps and one per validation (rank 0, through ``logging``).

    Train loss is the mean of the steps' ``train/loss`` since the previous line (BillaLM logs the token-weighted loss
    of each whole optimizer step, all ranks); for a module that logs none, the mean of the micro-batch losses. tokens/s
    counts the non-padding input
    tokens of this rank's batches over the same interval, times the number of ranks; ETA extrapolates the optimizer
    steps of this (re)started run to ``trainer.max_steps``.
    """

    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = max(1, int(every_n_steps))
        self._fit_start: float | None = None
        self._first_step: int | None = None  # global step when this process started training (resume-aware)
        self._first_time: float | None = None
        self._last_step = 0
        self._last_time = 0.0
        self._loss_sum = 0.0
        self._loss_steps = 0.0  # sum of 1/accumulation over micro batches = optimizer steps covered
        self._step_losses: list[float] = []  # the module's logged train/loss of each optimizer step
        self._seen_step: int | None = None
        self._tokens = 0
        self._baseline_logged = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._first_step is None:
            self._first_step = self._last_step = self._seen_step = trainer.global_step
            self._first_time = self._last_time = time.perf_counter()
            baseline = getattr(pl_module, "val_loss_start", None)  # BillaLM's step-0 validation, if it ran
            if baseline is not None and not self._baseline_logged:
                self._baseline_logged = True
                log.info(
                    "validation at step %d/%d: val/loss %s | val/ppl %s",
                    trainer.global_step,
                    trainer.max_steps,
                    _fmt_metric(baseline),
                    _fmt_metric(math.exp(min(baseline, 30))),
                )
        self._tokens += _batch_tokens(batch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning hands back the loss divided by accumulate_grad_batches: summed over one optimizer step's
            # micro batches it is that step's mean loss
            self._loss_sum += float(loss.detach())
            self._loss_steps += 1.0 / max(1, trainer.accumulate_grad_batches)
        step = trainer.global_step
        if step != self._seen_step:  # an optimizer step finished with this micro batch
            self._seen_step = step
            logged = trainer.callback_metrics.get("train/loss")
            if logged is not None:
                self._step_losses.append(float(logged))
        last = step >= trainer.max_steps > 0
        if step == self._last_step or (step % self.every_n_steps and not last):
            return
        self.log_line(trainer, step)

    def log_line(self, trainer: L.Trainer, step: int) -> None:
        now = time.perf_counter()
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        parts = [f"step {step}/{total} ({100.0 * step / total:.1f}%)" if total else f"step {step}"]
        if self._step_losses:
            parts.append(f"loss {sum(self._step_losses) / len(self._step_losses):.4f}")
        elif self._loss_steps:
            parts.append(f"loss {self._loss_sum / self._loss_steps:.4f}")
        lr = _current_lr(trainer)
        if lr is not None:
            parts.append(f"lr {lr:.3e}")
        interval = now - self._last_time
        if interval > 0 and self._tokens:
            parts.append(f"{self._tokens * trainer.world_size / interval:,.0f} tok/s")
        parts.append(f"elapsed {format_duration(now - (self._fit_start or self._first_time))}")
        done = step - self._first_step
        if total and done > 0:
            parts.append(f"ETA {format_duration((total - step) * (now - self._first_time) / done)}")
        log.info(" | ".join(parts))
        self._last_step, self._last_time = step, now
        self._loss_sum = self._loss_steps = 0.0
        self._step_losses = []
        self._tokens = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._first_step is not None and trainer.global_step != self._last_step:  # a stop between two lines
            self.log_line(trainer, trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not metrics:
            return
        ordered = sorted(metrics, key=lambda k: (k not in ("val/loss", "val/ppl"), k != "val/loss", k))
        values = " | ".join(f"{k} {_fmt_metric(metrics[k])}" for k in ordered)
        log.info("validation at step %d/%d: %s", trainer.global_step, trainer.max_steps, values)


class StepProgressBar(ProgressBar):
    """A terminal bar over the optimizer steps of the schedule (``global_step`` of ``max_steps``), not over epochs.

    Lightning's own bars count batches of an epoch; an iterable stream with ``max_steps`` has no epoch length, which
    is why they show "Epoch 0/-2". This one shows ``<stage>: 120/400 steps``, the train loss and lr, and a transient
    bar over the validation batches.
    """

    def __init__(self, description: str = "train"):
        super().__init__()
        self.description = description
        self._enabled = True
        self._train_bar: tqdm | None = None
        self._val_bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._train_bar = tqdm(
            total=total,
            initial=trainer.global_step,
            desc=self.description,
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0.1,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar = self._train_bar
        if bar is None or trainer.global_step == bar.n:
            return
        bar.update(trainer.global_step - bar.n)
        self._set_postfix(trainer, refresh=False)

    def _set_postfix(self, trainer: L.Trainer, refresh: bool) -> None:
        postfix = {}
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        lr = _current_lr(trainer)
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            postfix["val/loss"] = f"{float(val):.4f}"
        self._train_bar.set_postfix(postfix, refresh=refresh)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled or trainer.sanity_checking:
            return
        batches = sum(n for n in trainer.num_val_batches if math.isfinite(n)) if trainer.num_val_batches else None
        self._val_bar = tqdm(
            total=batches or None, desc="validation", unit="batch", leave=False, dynamic_ncols=True, file=sys.stdout
        )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._val_bar is not None:
            self._val_bar.update(1)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_bar is not None:
            self._val_bar.close()
            self._val_bar = None
        if self._train_bar is not None:  # show the new val/loss now, not at the next step
            self._set_postfix(trainer, refresh=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train_bar is not None:
            self._train_bar.close()
            self._train_bar = None


def progress_callbacks(
    mode: str, every_n_steps: int, enable_progress_bar: bool, description: str = "train"
) -> tuple[list[L.Callback], bool]:
    """The progress callbacks for ``mode`` and the value to pass as ``Trainer(enable_progress_bar=...)``.

    Args:
        mode: ``auto`` (bar on a terminal, text lines otherwise), ``bar``, ``text`` or ``none`` (config ``progress``).
        every_n_steps: optimizer steps between text lines (``trainer.log_every_n_steps``).
        enable_progress_bar: ``trainer.enable_progress_bar``; false turns the bar off (text lines stay: they are logs).
        description: the bar's label (the stage name).
    """
    mode = resolve_mode(mode)
    if mode == "text":
        return [TextProgress(every_n_steps)], False
    if mode == "bar" and enable_progress_bar:
        return [StepProgressBar(description)], True
    return [], False


def track(
    iterable: Iterable[T],
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    every_s: float = 30.0,
    amount: Callable[[T], float] | None = None,
) -> Iterator[T]:
    """Iterate with progress: a tqdm bar on a terminal, else a log line at most every ``every_s`` s and at the end.

    A line reads ``<desc>: 12/40 files (30.0%) | elapsed 0:00:12 | ETA 0:00:28``. Each item counts 1, or
    ``amount(item)`` (e.g. the fraction of a file it covered: ``12.4/40 files``).
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    amount = amount or (lambda _: 1)
    if is_interactive():
        with tqdm(total=total, desc=desc, unit=unit, file=sys.stdout, dynamic_ncols=True) as bar:
            for item in iterable:
                yield item
                bar.update(amount(item))
        return
    start = last = time.perf_counter()
    count = 0
    for item in iterable:
        yield item
        count += amount(item)
        now = time.perf_counter()
        if now - last >= every_s or (total and count >= total - 1e-9):
            _log_count(desc, count, total, unit, now - start)
            last = now
    if not total or count < total - 1e-9:  # a generator without a length, or one that ended early
        _log_count(desc, count, total, unit, time.perf_counter() - start)


def _log_count(desc: str, count: float, total: int | None, unit: str, elapsed: float) -> None:
    shown = f"{count:,.0f}" if abs(count - round(count)) < 1e-6 else f"{count:,.1f}"  # 12/40 files, 12.4/40 files
    done = f"{shown}/{total:,} {unit} ({100.0 * count / total:.1f}%)" if total else f"{shown} {unit}"
    parts = [f"{desc}: {done}" if desc else done, f"elapsed {format_duration(elapsed)}"]
    if total and count:
        parts.append(f"ETA {format_duration((total - count) * elapsed / count)}")
    log.info(" | ".join(parts))
