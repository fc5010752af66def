"""Resuming a ZeRO-3 checkpoint on another number of ranks, and checkpoints that cannot resume a run.

The slow tests train the SHORT_RUN schedule (global batch 16) uninterrupted on 1 rank (micro batch 8, accumulation 2)
and on 2 ranks (micro batch 8, no accumulation) under the real ZeRO-3 engine on CPU, then resume each one's step-4
checkpoint on the other world size: steps 5-8 must equal those of the uninterrupted run on the new world size.
The fast tests give ``resume_checkpoint`` checkpoints that do not fit the run and expect a ``ConfigError``
(``billa: error:``) naming the key or file and the fix, before any training.
"""

from __future__ import annotations

import pytest
import torch

from billa.config import ConfigError
from billa.distributed.reshard import optimizer_shards

from .conftest import ZERO3, logged, train_cli
from .helpers import run_door

# The global batch stays 16; the accumulation follows the world size, as when a job moves to half the GPUs.
ONE_RANK = [*ZERO3, "hardware.devices=1"]  # 16 = 8 x 1 rank x 2 accumulation
TWO_RANKS = ZERO3  # 16 = 8 x 2 ranks
WORLDS = {1: ONE_RANK, 2: TWO_RANKS}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir, sample_tokenizer_dir):
    """8 steps on 1 rank and on 2 ranks, checkpoints after steps 4 and 8, keyed by world size."""
    runs = {}
    for world, hardware in WORLDS.items():
        runs[world] = tmp_path_factory.mktemp(f"uninterrupted-{world}")
        train_cli(runs[world], cache_dir, *hardware)
    return runs


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cache_dir, uninterrupted):
    """The other world size's step-4 checkpoint resumed to step 8, keyed by the new world size."""
    runs = {}
    for world, hardware in WORLDS.items():
        checkpoint = uninterrupted[3 - world] / "checkpoints" / "step=000004.ckpt"
        assert len(optimizer_shards(checkpoint)) == 3 - world
        runs[world] = tmp_path_factory.mktemp(f"resumed-on-{world}")
        result = train_cli(runs[world], cache_dir, *hardware, f"ckpt_path='{checkpoint}'")
        runs[world] = (runs[world], result.stdout + result.stderr)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2], ids=["2-to-1-rank", "1-to-2-ranks"])
def test_resume_on_another_world_size_continues_the_run(uninterrupted, resumed, world):
    """Steps 5-8 after a 2 -> 1 (1 -> 2) rank resume equal those of a 1-rank (2-rank) run that never stopped.

    Bugs caught: DeepSpeed refusing the checkpoint ("The checkpoint being loaded used a DP world size of 2 but the
    current world size is 1"); a conversion that restores the weights but restarts Adam's moments (step 5 matches,
    steps 6-8 do not) or the schedule (the learning rate of step 5); a data position counted in micro batches of
    the old world size (the resumed run replays or skips samples); Lightning's micro-batch counters left at the old
    accumulation (2 -> 1 rank: validation after step 6 instead of step 8).
    """
    run_dir, output = resumed[world]
    assert f"was written by {3 - world} ranks, this run has {world}" in output
    assert f"Resumed {uninterrupted[3 - world] / 'checkpoints' / 'step=000004.ckpt'} on {world} ranks" in output
    assert "Lightning's batch counters rescaled" in output
    reference, losses = logged(uninterrupted[world], "train/loss"), logged(run_dir, "train/loss")
    assert sorted(losses) == [4, 5, 6, 7]  # CSV step = optimizer step - 1: steps 5-8
    diffs = {step: abs(losses[step] - reference[step]) for step in losses}
    assert max(diffs.values()) <= 1e-5, (diffs, losses, reference)
    val = logged(run_dir, "val/loss")
    assert sorted(val) == [7] and val[7] == pytest.approx(logged(uninterrupted[world], "val/loss")[7], abs=1e-5)
    # the next checkpoint is a regular one of the new world size; the conversion is not left behind
    assert len(optimizer_shards(run_dir / "checkpoints" / "step=000008.ckpt")) == world
    assert not (run_dir / "reshard").exists()


def zero_checkpoint(root, ranks: int = 2, stage: int = 3, step: int = 4, consumed: int = 64, present=None):
    """A billa-shaped ZeRO checkpoint directory: rank 0's client state and the optimizer partitions ``present``."""
    ckpt = root / "run" / "checkpoints" / f"step={step:06d}.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(f"global_step={step}\n")
    client = {
        "dp_world_size": ranks,
        "ds_config": {"zero_optimization": {"stage": stage}},
        "global_step": step,
        "BillaDataModule": {"consumed_samples": consumed, "seed": 42},
    }
    torch.save(client, ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    for rank in range(ranks) if present is None else present:
        torch.save(
            {"optimizer_state_dict": {}}, ckpt / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        )
    return ckpt


@pytest.mark.parametrize(
    ("hardware", "checkpoint", "message"),
    [
        (
            ZERO3,
            {"file": True},
            r"ckpt_path=.*step=000004\.ckpt is a single-file checkpoint .* DeepSpeed ZeRO-3, .* init_from=",
        ),
        ([], {}, r"ckpt_path=.* is a DeepSpeed checkpoint directory, but .*\(hardware=cpu_zero3.*op=zero_to_hf"),
        (
            ZERO3,
            {"present": [0]},
            r"written by 2 ranks .* holds 1 optimizer partitions; missing \['checkpoint/zero_pp_rank_1_mp_rank_00_"
            r"optim_states\.pt'\]\. Copy the whole checkpoint directory",
        ),
        (ZERO3, {"stage": 2}, r"written with ZeRO stage 2, this run uses stage 3 .* Resume with stage 2"),
        (
            [*ONE_RANK, "hardware.strategy.config.zero_optimization.stage=2"],
            {"stage": 2},
            r"written by 2 ranks, this run has 1 \(hardware.devices=1 x hardware.num_nodes=1\), and DeepSpeed "
            r"converts ZeRO-2 checkpoints to another world size only with Megatron's metadata. Resume on 2 ranks",
        ),
        (
            [*ONE_RANK, "hardware.micro_batch_size=16"],
            {"consumed": 24, "step": 3},
            r"consumed 24 samples \(step 3 x global batch 8\), not a whole number of rounds of "
            r"hardware.micro_batch_size=16 x 1 ranks.*Keep batch.global_size=8",
        ),
    ],
    ids=["file-for-zero", "zero-dir-without-deepspeed", "missing-shard", "zero-stage", "zero-2-world-size", "batch"],
)
def test_checkpoint_that_does_not_fit_stops_before_training(compose, tmp_path, hardware, checkpoint, message):
    """A checkpoint the run cannot resume from is refused by ``resume_checkpoint``, naming the key, file and fix.

    Bugs caught: a DDP ``.ckpt`` given to a ZeRO run failing inside Lightning with "not a valid DeepSpeed
    checkpoint" after the model was built; a ZeRO directory given to a run without DeepSpeed loading as an empty
    state dict; a copy missing one rank's shard failing in DeepSpeed's load with a bare FileNotFoundError; another
    ZeRO stage or global batch failing after minutes of setup, in the engine or in the data sampler.
    """
    from billa.train import resume_checkpoint

    if checkpoint.pop("file", False):
        path = tmp_path / "step=000004.ckpt"
        torch.save({"state_dict": {}, "global_step": 4}, path)
    else:
        path = zero_checkpoint(tmp_path, **checkpoint)
    cfg = compose([*hardware, f"ckpt_path='{path}'", "logger=none"], output_dir=tmp_path / "out")
    with pytest.raises(ConfigError, match=message):
        resume_checkpoint(cfg)


def test_zero_three_checkpoint_on_another_world_size_is_accepted(compose, tmp_path, caplog):
    """Bug caught: the fit check refusing what the strategy converts (a ZeRO-3 checkpoint of 2 ranks on 1 rank)."""
    from billa.train import resume_checkpoint

    path = zero_checkpoint(tmp_path)
    cfg = compose([*ONE_RANK, f"ckpt_path='{path}'", "logger=none"], output_dir=tmp_path / "out")
    with caplog.at_level("INFO", logger="billa"):
        assert resume_checkpoint(cfg) == str(path)
    assert "written by 2 ranks, this run has 1: it is converted to a universal checkpoint at load" in caplog.text


def test_checkpoint_that_does_not_fit_stops_the_cli_with_billa_error(tmp_path, cache_dir):
    """Through ``train.py``: exit status 2 and a ``billa: error:`` block before any model is built or step taken."""
    path = tmp_path / "step=000004.ckpt"
    torch.save({"state_dict": {}, "global_step": 4}, path)
    result = run_door(
        "train.py",
        *ZERO3,
        f"ckpt_path='{path}'",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'out'}",
        timeout=300,
        env={"BILLA_CACHE_DIR": str(cache_dir)},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "billa: error: ckpt_path=" in result.stderr and "is a single-file checkpoint" in result.stderr
    assert "Memory plan" not in result.stdout + result.stderr  # stopped before the model and the trainer
