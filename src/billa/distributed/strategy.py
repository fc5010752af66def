"""DeepSpeed strategies: atomic sharded checkpoints, and the real ZeRO-3 engine on CPU for tests.

``BillaDeepSpeedStrategy`` is Lightning's ``DeepSpeedStrategy`` whose backward scales the loss for gradient
accumulation once (Lightning's division, not DeepSpeed's second one), and whose checkpoints are written into
``<path>.partial`` in the destination directory and renamed to ``<path>`` only after every rank finished and flushed its
shard, ``MANIFEST.json`` recorded every file's size and SHA-256 and a ``COMPLETE`` marker was written: a crash or a full
disk mid-save never leaves a directory that looks complete, and ``resume=auto`` skips one that does not match its
manifest (``billa.distributed.checkpoints``).

``CPUDeepSpeedStrategy`` runs the same engine on CPU processes over gloo. Lightning refuses a CPU accelerator for
DeepSpeed; three overrides lift that (docs/recipe.md, "Traps"): the environment comes from DDP, the CUDA
device-index check is skipped, and the root device is ``cpu:0``. Parameters are really partitioned
(``p.numel() == 0``, ``p.ds_numel``).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from billa.distributed.checkpoints import (
    COMPLETE_MARKER,
    DIRECTORY_MANIFEST,
    PARTIAL_SUFFIX,
    file_digest,
    fsync_directory,
    write_atomic,
    write_manifest,
)
from billa.distributed.reshard import load_resharded, realign_accumulation, saved_world_size

# DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 deprecates, once per parameter per step.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+ is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class BillaDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` with atomic checkpoint directories."""

    strategy_name = "billa_deepspeed"

    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Backward through the engine without its division by the accumulation count.

        Lightning's automatic optimisation already divides the loss by ``accumulate_grad_batches``;
        ``DeepSpeedEngine.backward`` divides again unless ``scale_wrt_gas=False``. Scaled twice, the accumulated
        gradient is 1/accumulation of the true one and gradient clipping acts at accumulation x the configured norm.
        """
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        final = Path(self.broadcast(str(filepath)))
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)  # every rank writes its shard
        self.barrier()
        files = self._flush_and_digest(partial)
        if self.is_global_zero:
            write_manifest(partial / DIRECTORY_MANIFEST, {"global_step": checkpoint.get("global_step"), "files": files})
            write_atomic(partial / COMPLETE_MARKER, f"global_step={checkpoint.get('global_step')}\n".encode())
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync_directory(final.parent)
        self.barrier()

    def _flush_and_digest(self, directory: Path) -> dict[str, dict]:
        """Every file under ``directory``: fsynced and hashed, the work spread over the ranks; rank 0 gets all entries.

        Rank 0's listing is the one every rank works from (a shared file system may show another node's files late).
        Each rank reads about 1/world of the checkpoint once, mostly from the page cache it was just written to.
        """
        names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
        names = self.broadcast(names)
        mine = {name: file_digest(directory / name, fsync=True) for name in names[self.global_rank :: self.world_size]}
        if self.world_size == 1:
            return mine
        gathered: list[dict] = [{} for _ in range(self.world_size)]
        torch.distributed.all_gather_object(gathered, mine)
        return dict(sorted(entry for part in gathered for entry in part.items()))

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """DeepSpeed's load; a checkpoint written by another number of ranks goes through a universal one, and
        Lightning's micro-batch counters follow a changed gradient accumulation (``billa.distributed.reshard``)."""
        saved = None if self.load_full_weights else saved_world_size(checkpoint_path)
        if saved is None or saved == self.world_size:
            state = super().load_checkpoint(checkpoint_path, weights_only)
        else:
            load = functools.partial(super().load_checkpoint, weights_only=weights_only)
            state = load_resharded(self, checkpoint_path, saved, load)
        return realign_accumulation(state, self.lightning_module.trainer.accumulate_grad_batches)


class CPUDeepSpeedStrategy(BillaDeepSpeedStrategy):
    """The real DeepSpeed engine (ZeRO-3 included) on CPU processes over gloo."""

    strategy_name = "billa_deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's "only supported on CUDA GPUs"

    def setup_distributed(self) -> None:
        reset_seed()  # as DeepSpeedStrategy does, without its CUDA device-index validation
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # deepspeed.initialize reads root_device.index as the device rank

    def _get_process_group_backend(self) -> str:
        return "gloo"
