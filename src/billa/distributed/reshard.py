"""Resuming a ZeRO checkpoint on another number of ranks, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one flat partition of the fp32 master weights and Adam moments per data-parallel rank
(``checkpoint/zero_pp_rank_{r}_mp_rank_00_optim_states.pt``); DeepSpeed's own load refuses another world size.
``deepspeed.checkpoint.ds_to_universal`` merges the partitions into one file per parameter and state
(``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``), which an engine with ``load_universal_checkpoint`` re-slices for its
own world size (ZeRO-3 supported since DeepSpeed 0.16, checked on 0.19 on CPU: losses after a 2 -> 1 and 1 -> 2 rank
resume equal those of a run that never stopped, tests/test_resume_world_size.py). The rest of Lightning's checkpoint
(step, schedule, loops, data position, RNG) is the client state of the model-states files, copied as is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

from billa.utils.logging import get_logger

log = get_logger(__name__)

TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under
UNIVERSAL_DONE = "UNIVERSAL_COMPLETE"
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def optimizer_shards(checkpoint: str | os.PathLike) -> dict[int, Path]:
    """The ZeRO optimizer partitions of a Lightning DeepSpeed checkpoint directory, by data-parallel rank."""
    folder = Path(checkpoint) / TAG
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in folder.iterdir() if (m := _OPTIM.match(p.name))}


def saved_world_size(checkpoint: str | os.PathLike) -> int | None:
    """How many data-parallel ranks wrote ``checkpoint`` (None: no ZeRO optimizer partitions in it)."""
    shards = optimizer_shards(checkpoint)
    return len(shards) or None


def to_universal(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a Lightning DeepSpeed checkpoint directory into a universal one that any world size loads.

    Run on one rank; loads run weights-only when called under ``billa.distributed.safe_load.weights_only_loading``.
    A finished conversion is marked (``UNIVERSAL_COMPLETE``) and reused.

    Returns:
        ``out_dir``, laid out as a DeepSpeed checkpoint directory: ``latest_universal`` naming tag ``checkpoint``,
        ``checkpoint/*model_states.pt`` (the client state) and ``checkpoint/zero/<param>/<state>.pt``.
    """
    from deepspeed.checkpoint import ds_to_universal  # slow import: only when a conversion is due

    out = Path(out_dir)
    if (out / UNIVERSAL_DONE).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(Path(checkpoint) / TAG),
        output_folder=str(out / TAG),
        num_extract_workers=1,  # worker processes would not add speed on a single node's few cores worth the fork
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    ds_to_universal.main(args)
    (out / UNIVERSAL_DONE).write_text(f"from={checkpoint}\n")
    return out


def load_resharded(strategy, checkpoint: str | os.PathLike, saved: int, load) -> dict:
    """Load a checkpoint that ``saved`` ranks wrote into ``strategy``'s engine on its own world size.

    Rank 0 converts it to a universal checkpoint under ``<output_dir>/reshard/`` (a directory every rank sees, as
    the checkpoints do), every rank loads its own slice from there with ``load`` (Lightning's DeepSpeed load) and the
    conversion is deleted afterwards: it is as large as the checkpoint and the next checkpoint is a regular one.

    Returns:
        The client state (what Lightning restores the step, schedule, loops, data position and RNG from).
    """
    universal = Path(strategy.lightning_module.trainer.default_root_dir) / "reshard" / Path(checkpoint).name
    universal = Path(strategy.broadcast(str(universal)))
    error = None
    if strategy.is_global_zero:
        log.info(
            "%s was written by %d ranks, this run has %d: converting it to a universal checkpoint in %s",
            checkpoint,
            saved,
            strategy.world_size,
            universal,
        )
        try:
            to_universal(checkpoint, universal)
        except Exception as err:  # every rank must learn of it, or the others wait at the barrier for ever
            error = f"{type(err).__name__}: {err}"
    error = strategy.broadcast(error)
    if error:
        raise RuntimeError(f"{checkpoint}: converting the {saved}-rank ZeRO checkpoint failed: {error}")
    config = strategy.deepspeed_engine._config
    config.load_universal_checkpoint = True
    try:
        state = load(str(universal))
    finally:
        config.load_universal_checkpoint = False
    strategy.barrier()
    if strategy.is_global_zero:
        shutil.rmtree(universal, ignore_errors=True)
        log.info("Resumed %s on %d ranks (was %d)", checkpoint, strategy.world_size, saved)
    return state
