"""Resuming a ZeRO checkpoint on another number of ranks, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one flat partition of the fp32 master weights and Adam moments per data-parallel rank
(``checkpoint/zero_pp_rank_{r}_mp_rank_00_optim_states.pt``); DeepSpeed's own load refuses another world size.
``deepspeed.checkpoint.ds_to_universal`` merges the partitions into one file per parameter and state
(``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``), which an engine with ``load_universal_checkpoint`` re-slices for its
own world size (ZeRO-3 included; checked on DeepSpeed 0.19 on CPU: losses after a 2 -> 1 and 1 -> 2 rank
resume equal those of a run that never stopped, tests/test_resume_world_size.py). The rest of Lightning's checkpoint
(step, schedule, loops, data position, RNG) is the client state of the model-states files, copied as is; the data
position is a sample count (steps x global batch), the same on any world size that keeps the global batch, and
Lightning's micro-batch counters are rescaled when the accumulation changes with the world size
(``realign_accumulation``). ``check_resumable`` refuses, before any training, a checkpoint that cannot resume the run.
"""

from __future__ import annotations

import argparse
import contextlib
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
        # in this process: a process pool forked from a rank that holds a process group and torch's threads can hang
        num_extract_workers=1,
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
        from billa.utils.errors import ConfigError

        raise ConfigError(f"{checkpoint}: converting the {saved}-rank ZeRO checkpoint failed: {error}")
    config = strategy.deepspeed_engine._config
    config.load_universal_checkpoint = True
    try:
        state = load(str(universal))
    finally:
        config.load_universal_checkpoint = False
    strategy.barrier()
    if strategy.is_global_zero:
        shutil.rmtree(universal, ignore_errors=True)
        with contextlib.suppress(OSError):  # only when empty: another conversion may be under way there
            universal.parent.rmdir()
        log.info("Resumed %s on %d ranks (was %d)", checkpoint, strategy.world_size, saved)
    return state


def _client_state(states: Path, trust: bool) -> dict:
    import torch

    from billa.distributed.safe_load import weights_only_loading

    with weights_only_loading(trust):
        return torch.load(states, map_location="cpu", weights_only=not trust)


def check_resumable(checkpoint: str | os.PathLike, key: str, hardware, trust: bool = False) -> None:
    """Stop before any training when ``checkpoint`` cannot resume a run on ``hardware``, saying why and the fix.

    Checked: a single-file checkpoint for a DeepSpeed run and a DeepSpeed directory for a run without it; a ZeRO
    directory missing one of the ranks' optimizer partitions; another ZeRO stage; another number of ranks where
    DeepSpeed cannot convert (ZeRO-1/2 universal conversion needs Megatron's metadata); a data position that is not
    a whole number of rounds of this run's micro batch x ranks (the global batch changed). Another number of ranks
    under ZeRO-3 is fine: the strategy converts the checkpoint at load (``load_resharded``).

    Args:
        checkpoint: the checkpoint file or directory (already checked by ``safe_load.check_checkpoint``).
        key: the config key that named it (for the message).
        hardware: the run's ``billa.config.HardwarePlan``.
        trust: ``trust_checkpoint`` (load the client state with ``weights_only=False``).

    Raises:
        ConfigError: naming the key, the file and the fix.
    """
    from billa.utils.errors import ConfigError

    path, stage, batch = Path(checkpoint), hardware.zero_stage, hardware.batch
    world = batch.world_size
    start_from_weights = (
        f"or start from its weights, the optimizer state afresh: python convert.py op=zero_to_hf "
        f"op.checkpoint={path} op.out_dir=<dir>, then init_from=<dir> instead of {key}"
    )
    if path.is_file():
        if stage is not None:
            raise ConfigError(
                f"{key}={path} is a single-file checkpoint (written without DeepSpeed), but this run trains with "
                f"DeepSpeed ZeRO-{stage}, which resumes only from a DeepSpeed checkpoint directory. Resume it with "
                "the hardware config it was written with, or start from its weights with init_from=<that run's HF "
                "export, <run>/hf> (the optimizer state starts afresh)"
            )
        return
    states = path / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if stage is None:
        raise ConfigError(
            f"{key}={path} is a DeepSpeed checkpoint directory, but this run's hardware config does not use "
            "DeepSpeed. Resume it with a DeepSpeed hardware config (hardware=cpu_zero3, 8xa100, ...), "
            + start_from_weights
        )
    if not states.is_file():
        raise ConfigError(f"{key}={path}: no {states.relative_to(path)}: not a DeepSpeed checkpoint written by billa")
    client = _client_state(states, trust)
    saved = int(client.get("dp_world_size") or 1)
    shards = optimizer_shards(path)
    missing = [f"{TAG}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(saved) if r not in shards]
    if missing or len(shards) != saved:
        raise ConfigError(
            f"{key}={path}: written by {saved} ranks (dp_world_size in {states.name}) but holds {len(shards)} "
            f"optimizer partitions; missing {missing or 'none'}. Copy the whole checkpoint directory, every rank's "
            "files included, " + start_from_weights
        )
    saved_stage = (client.get("ds_config") or {}).get("zero_optimization", {}).get("stage")
    if saved_stage is not None and saved_stage != stage:
        raise ConfigError(
            f"{key}={path}: written with ZeRO stage {saved_stage}, this run uses stage {stage} "
            f"(hardware.strategy.config.zero_optimization.stage). Resume with stage {saved_stage}, "
            + start_from_weights
        )
    if saved != world and stage < 3:
        raise ConfigError(
            f"{key}={path}: written by {saved} ranks, this run has {world} (hardware.devices={batch.devices} x "
            f"hardware.num_nodes={batch.num_nodes}), and DeepSpeed converts ZeRO-{stage} checkpoints to another "
            f"world size only with Megatron's metadata. Resume on {saved} ranks, " + start_from_weights
        )
    step = int(client.get("global_step") or 0)
    consumed = int((client.get("BillaDataModule") or {}).get("consumed_samples") or 0)
    if consumed % (batch.micro_size * world):
        raise ConfigError(
            f"{key}={path}: the run consumed {consumed} samples (step {step} x global batch "
            f"{consumed // max(step, 1)}), not a whole number of rounds of hardware.micro_batch_size="
            f"{batch.micro_size} x {world} ranks: the data stream cannot continue where it stopped. Keep "
            f"batch.global_size={consumed // max(step, 1)} as the run that wrote it (now {batch.global_size})"
        )
    if saved != world:
        log.info(
            "%s=%s was written by %d ranks, this run has %d: it is converted to a universal checkpoint at load",
            key,
            path,
            saved,
            world,
        )


def realign_accumulation(state: dict, accumulation: int) -> dict:
    """Rescale Lightning's micro-batch counters in ``state`` from the checkpoint's gradient accumulation to this run's.

    Lightning counts micro batches in its loop state and steps the optimizer when the count is a multiple of the
    accumulation; validation comes every ``val_every_n_steps x accumulation`` micro batches of the same count. A run
    resumed on another world size keeps its global batch by changing the accumulation (8 ranks x 2 -> 4 ranks x 4):
    unscaled, the first step after a resume at step 5 from accumulation 1 to 2 would take one micro batch and every
    later step and validation would fall half an accumulation early. Optimizer steps (the step count, the schedule,
    the data position) are unaffected; only the micro-batch counters move, by ``steps x (new - old)``.

    Args:
        state: Lightning's checkpoint (the client state of a DeepSpeed one, ``ds_config`` naming its accumulation).
        accumulation: this run's ``accumulate_grad_batches``.

    Returns:
        ``state``, changed in place.
    """
    saved = int((state.get("ds_config") or {}).get("gradient_accumulation_steps") or 0)
    progress = ((state.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.batch_progress")
    if not saved or saved == accumulation or not progress:
        return state
    for scope in ("total", "current"):
        counters = progress.get(scope) or {}
        steps = int(counters.get("ready", 0)) // saved
        for name in ("ready", "started", "processed", "completed"):
            if name in counters:
                counters[name] += steps * (accumulation - saved)
    log.info(
        "The checkpoint accumulated %d micro batches per step, this run %d: Lightning's batch counters rescaled",
        saved,
        accumulation,
    )
    return state
