"""What the step benchmarks share: clocks that start after the warm-up steps, and the quiet trainers they time.

``train_step.py`` and ``recipe_batches.py`` time billa (a Lightning ``Trainer``) against ``transformers.Trainer`` the
same way: the clock starts at the first untimed-no-more step and stops at the end of training, with the GPU
synchronised at both ends, and no logging, checkpointing, validation or progress bar inside the timed steps.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from transformers import TrainerCallback, TrainingArguments


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class LightningClock(L.Callback):
    """Seconds from the start of step ``warmup`` to the end of training, and every step's loss."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.losses = warmup, None, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = _now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())

    def on_train_end(self, trainer, pl_module):
        self.end = _now()


class HFClock(TrainerCallback):
    """``LightningClock`` for ``transformers.Trainer``."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.start = _now()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = _now()


QUIET = {  # nothing but the steps: no logger, checkpoints, progress bar, model summary or validation
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}


def quiet_trainer(**overrides) -> L.Trainer:
    """An ``L.Trainer`` with ``QUIET`` settings updated by ``overrides`` (the tests' quiet trainer too)."""
    return L.Trainer(**{**QUIET, **overrides})


def fit_lightning(
    module,
    loader,
    clock: LightningClock,
    root: str,
    *,
    accelerator: str,
    precision: str,
    steps: int,
    clip: float | None,
) -> None:
    """``Trainer.fit`` for ``steps`` optimizer steps with nothing but ``clock`` around the steps."""
    trainer = quiet_trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=steps,
        gradient_clip_val=clip,
        callbacks=[clock],
        default_root_dir=root,
    )
    trainer.fit(module, loader)


def hf_arguments(
    root: str, *, steps: int, batch: int, lr: float, clip: float, warmup_steps: int, cpu: bool, bf16: bool, **extra
) -> TrainingArguments:
    """HF Trainer's arguments for the same run: AdamW (0.9, 0.95), weight decay 0.1, cosine schedule, no logging."""
    return TrainingArguments(
        output_dir=root,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=clip,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        use_cpu=cpu,
        bf16=bf16,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **extra,
    )
