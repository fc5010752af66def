"""Training callbacks: throughput logging."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s`` (all devices) and ``train/tokens_per_s_per_device``.

    Tokens are the non-padding input tokens of the batches; the rate is measured over the optimizer steps between
    two logging points, so data loading and the optimizer step are included.
    """

    def __init__(self, log_every_n_steps: int = 10):
        self.log_every_n_steps = max(1, log_every_n_steps)
        self._tokens = 0
        self._start: float | None = None
        self._last_step = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()
            self._last_step = trainer.global_step
        self._tokens += int(batch["attention_mask"].sum())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        steps = trainer.global_step - self._last_step
        if steps < self.log_every_n_steps:
            return
        elapsed = time.perf_counter() - self._start
        per_device = self._tokens / elapsed
        pl_module.log("train/tokens_per_s_per_device", per_device, on_step=True, on_epoch=False)
        pl_module.log(
            "train/tokens_per_s", per_device * trainer.world_size, on_step=True, on_epoch=False, prog_bar=True
        )
        self._tokens, self._start, self._last_step = 0, time.perf_counter(), trainer.global_step
