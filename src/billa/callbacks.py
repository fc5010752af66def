"""Training callbacks: throughput and MFU logging, ZeRO partition report, secrets kept out of checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from billa.distributed.memory import partition_report
from billa.utils.logging import get_logger
from billa.utils.secrets import redact

log = get_logger(__name__)


def flops_per_token(n_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) + 12 L h s for attention (PaLM, App. B)."""
    return 6.0 * n_params + 12.0 * num_layers * hidden_size * seq_len


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s``, ``train/tokens_per_s_per_device``, ``train/tflops_per_device``, ``train/mfu``,
    ``train/gpu_mem_gb`` and per-source accounting.

    ``train/tokens/<source>`` and ``train/samples/<source>`` count what every rank consumed since the run (re)started;
    ``train/mix/<source>`` is the realised share of samples, so a chart shows that stage 2 really is 1:1, and
    ``train/mix_error/<source>`` that share minus the configured one (``data.mix``'s weight over their sum).

    Tokens are the non-padding input tokens of this rank's batches; the rate is measured over the optimizer steps
    between two logging points, so data loading and the optimizer step are included. MFU = achieved model FLOPs /
    the device's peak (``hardware.peak_tflops``); activation recomputation is not counted as useful work.
    ``train/tflops_per_device`` is the same achieved model FLOP rate in TFLOP/s, logged without a peak too.
    ``train/gpu_mem_gb`` (CUDA only) is this rank's peak allocated GPU memory since the process started, in GiB
    (``torch.cuda.max_memory_allocated``): what the memory plan has to fit.
    """

    def __init__(
        self, log_every_n_steps: int = 10, flops_per_token: float | None = None, peak_tflops: float | None = None
    ):
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_tflops * 1e12 if peak_tflops else None
        self._tokens = 0
        self._start: float | None = None
        self._last_step = 0
        self.source_tokens: dict[str, int] = {}  # this rank's tokens per source since the run (re)started
        self.source_samples: dict[str, int] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()
            self._last_step = trainer.global_step
        self._tokens += sum(batch["sample_tokens"])
        for source, tokens in zip(batch.get("source", ()), batch["sample_tokens"], strict=False):
            self.source_tokens[source] = self.source_tokens.get(source, 0) + tokens  # cumulative per source
            self.source_samples[source] = self.source_samples.get(source, 0) + 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step - self._last_step < self.log_every_n_steps:
            return
        per_device = self._tokens / (time.perf_counter() - self._start)
        metrics = {"train/tokens_per_s_per_device": per_device, "train/tokens_per_s": per_device * trainer.world_size}
        metrics.update(model_flops(per_device, self.flops_per_token, self.peak_flops))
        if pl_module.device.type == "cuda":
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        # Every source of the mix on every rank, 0 where this rank drew none: each key is a collective (sync_dist),
        # and a rank that saw fewer sources (stage 3's 12-sample cycle in blocks of 2 per rank: some ranks never
        # draw code-alpaca-en) would run fewer all_reduces than the others, a collective mismatch that kills the job.
        mix = getattr(getattr(trainer, "datamodule", None), "mix", None) or {}
        sources = sorted(set(self.source_samples) | set(mix))
        if sources:  # summed over ranks: train/tokens/<source>, train/samples/<source>, train/mix/<source>
            total = max(sum(self.source_samples.values()), 1)
            per_source = {}
            for source in sources:
                samples = self.source_samples.get(source, 0)
                per_source[f"train/tokens/{source}"] = float(self.source_tokens.get(source, 0))
                per_source[f"train/samples/{source}"] = float(samples)
                per_source[f"train/mix/{source}"] = samples / total
            sums = {k: v for k, v in per_source.items() if not k.startswith("train/mix/")}
            pl_module.log_dict(sums, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="sum")
            ratios = {k: v for k, v in per_source.items() if k.startswith("train/mix/")}
            ratios.update(mix_error(ratios, mix))
            pl_module.log_dict(ratios, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="mean")
        self._tokens, self._start, self._last_step = 0, time.perf_counter(), trainer.global_step


def model_flops(tokens_per_s_per_device: float, flops_per_token: float | None, peak_flops: float | None) -> dict:
    """``train/tflops_per_device`` (achieved model FLOP/s / 1e12) and, with a device peak, ``train/mfu``."""
    if not flops_per_token:
        return {}
    achieved = tokens_per_s_per_device * flops_per_token  # FLOP/s on one device
    metrics = {"train/tflops_per_device": achieved / 1e12}
    if peak_flops:
        metrics["train/mfu"] = achieved / peak_flops
    return metrics


def mix_error(realised: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """``train/mix_error/<source>``: the realised share (``train/mix/<source>``) minus ``weight / sum(weights)``.

    The realised share counts every sample since the run (re)started, so under ``round_robin`` the error shrinks
    towards 0 as whole mix cycles complete; a source the loader starves shows a steady negative error.
    """
    total = sum(weights.values())
    if not total:
        return {}
    return {
        f"train/mix_error/{source}": realised.get(f"train/mix/{source}", 0.0) - weights.get(source, 0) / total
        for source in sorted(set(weights) | {k.removeprefix("train/mix/") for k in realised})
    }


class StepTimes(L.Callback):
    """Logs where an optimizer step's time goes, averaged per optimizer step between two logging points.

    - ``train/step_time/data``: waiting for the next micro batch, from the end of one micro batch to the start of the
      next (the data loader, moving the batch to the device, and a checkpoint saved at that step). Time spent in
      validation is left out.
    - ``train/step_time/compute``: forward and backward of the step's micro batches (to ``on_before_optimizer_step``).
    - ``train/step_time/optimizer``: gradient norm, clipping and the optimizer step (under DeepSpeed its ``step``).

    The three add up to the step's wall time outside validation. On CPU the marks are host clock readings. On CUDA they
    are CUDA events recorded on the current stream, read (one synchronisation) only at logging steps, so they measure
    the device's timeline without slowing the step: ``data`` is then the time the device sat idle waiting for a batch.
    """

    KINDS = ("data", "compute", "optimizer")

    def __init__(self, log_every_n_steps: int = 10):
        self.log_every_n_steps = max(1, log_every_n_steps)
        self._intervals: list[tuple[str, object, object]] = []  # (kind, start mark, end mark)
        self._batch_start = self._optimizer_start = self._last_end = None
        self._last_step: int | None = None
        self._cuda = False

    def _mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self._cuda else end - start  # CUDA events measure milliseconds

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._cuda = pl_module.device.type == "cuda"
        self._last_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._batch_start = self._mark()
        if self._last_end is not None:
            self._intervals.append(("data", self._last_end, self._batch_start))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self._batch_start is not None:
            self._optimizer_start = self._mark()
            self._intervals.append(("compute", self._batch_start, self._optimizer_start))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        end = self._mark()
        if self._optimizer_start is not None:
            self._intervals.append(("optimizer", self._optimizer_start, end))
        else:  # a micro batch that only accumulates gradients
            self._intervals.append(("compute", self._batch_start, end))
        self._optimizer_start, self._last_end = None, end
        steps = trainer.global_step - self._last_step
        if steps < self.log_every_n_steps:
            return
        if self._cuda:
            end.synchronize()  # once per logging step: every event recorded so far has happened
        totals = dict.fromkeys(self.KINDS, 0.0)
        for kind, start, stop in self._intervals:
            totals[kind] += self._seconds(start, stop)
        per_step = {f"train/step_time/{kind}": seconds / steps for kind, seconds in totals.items()}
        pl_module.log_dict(per_step, on_step=True, on_epoch=False)
        self._intervals, self._last_step = [], trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # validation inside training is not a data wait

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch_start is not None:  # after the first training batch (not the step-0 validation)
            self._last_end = self._mark()


class PartitionReport(L.Callback):
    """Writes what each rank really holds (``<dir>/rank<N>.json``) and logs rank 0's.

    The report is taken at the start of training (after DeepSpeed set up the engine) and, under ``at_build``, right
    after ``configure_model`` built the model, with ``peak_materialised_numel``: the most parameter elements this rank
    held at once while building (ZeRO-3: about one submodule, never the whole model).
    """

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = partition_report(pl_module.model)
        report.update(rank=trainer.global_rank, world_size=trainer.world_size)
        report["at_build"] = getattr(pl_module, "build_report", None)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
        log.info(
            "Parameters on rank 0: a %d-element shard of %d (%d of %d tensors partitioned away)",
            report["shard_numel"],
            report["full_numel"],
            report["empty_parameters"],
            report["parameters"],
        )


class StopAtStep(L.Callback):
    """Stop cleanly after optimizer step ``step`` of a longer schedule (a SLURM time slice, or a test's crash)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every N optimizer steps that also saves at the last step (max_steps or a clean stop).

    Saving from inside the training loop (not ``trainer.save_checkpoint`` after ``fit``) keeps the loop state
    mid-epoch, so a resume continues the same data stream.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        last = trainer.global_step >= trainer.max_steps or trainer.should_stop
        if last and self._last_global_step_saved != trainer.global_step and not trainer.fit_loop._should_accumulate():
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


class RedactCheckpointHparams(L.Callback):
    """Checkpoints carry the module's hyperparameters with secrets masked (``billa.utils.secrets.redact``).

    ``+model.hf_token=...`` would otherwise be pickled into every checkpoint a run writes (and shares).
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = redact(dict(checkpoint["hyper_parameters"]))
