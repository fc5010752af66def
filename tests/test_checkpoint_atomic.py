"""A save that fails (a full disk) leaves no checkpoint that looks complete; resume=auto takes the last whole one.

Issue 23: Lightning's writer built the file in the system's temporary directory and moved it; across file systems the
move is a copy that ENOSPC cut off under the final name, and resume=auto then picked the cut-off file.
"""

from __future__ import annotations

import builtins
import csv
import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from billa.distributed.checkpoints import (
    COMPLETE_MARKER,
    DIRECTORY_MANIFEST,
    file_digest,
    find_resume_checkpoint,
    incomplete_reason,
    manifest_path,
    resolve_ckpt_path,
    save_file_checkpoint,
)

from .conftest import logged, train_cli, train_in_process


class SmallDisk:
    """A file system of ``room`` bytes under ``root``: files opened for writing there share the room, and the write
    that crosses it lands in part, then raises ENOSPC (whichever writer opened the file, however it moves it)."""

    def __init__(self, root: Path, room: int):
        self.root, self.room = Path(root).resolve(), room

    def install(self, monkeypatch) -> None:
        real_open = builtins.open

        def open_on_disk(file, mode="r", *args, **kwargs):
            opened = real_open(file, mode, *args, **kwargs)
            if isinstance(file, str | os.PathLike) and set(mode) & set("wax+"):
                if Path(file).resolve().is_relative_to(self.root):
                    return _OnSmallDisk(opened, self)
            return opened

        monkeypatch.setattr(builtins, "open", open_on_disk)


class _OnSmallDisk:
    def __init__(self, file, disk: SmallDisk):
        self._file, self._disk = file, disk

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self._disk.room:
            self._file.write(data[: self._disk.room])
            self._file.flush()
            self._disk.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.room -= len(data)
        return self._file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def checkpoint(step: int) -> dict:
    torch.manual_seed(step)
    return {"global_step": step, "state_dict": {"w": torch.randn(256, 256)}}  # 256 KiB of weights


def test_a_save_cut_off_by_a_full_disk_leaves_no_file_under_its_name(tmp_path, monkeypatch, caplog):
    """Bug caught: writing (or moving) into the final name before the bytes are all there: ENOSPC leaves a cut-off
    ``step=000004.ckpt`` that resume=auto picks over step 2; and a temporary file left behind to fill the disk."""
    save_file_checkpoint(checkpoint(2), tmp_path / "step=000002.ckpt")
    SmallDisk(tmp_path, room=100_000).install(monkeypatch)  # 100 kB left: 2/5 of the next checkpoint
    with pytest.raises(OSError) as failure:
        save_file_checkpoint(checkpoint(4), tmp_path / "step=000004.ckpt")
    assert failure.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=000002.ckpt", "step=000002.ckpt.manifest.json"]
    with caplog.at_level(logging.WARNING, logger="billa"):
        assert find_resume_checkpoint(tmp_path) == str(tmp_path / "step=000002.ckpt")
    assert "Skipping" not in caplog.text  # nothing incomplete was left to skip
    saved = torch.load(tmp_path / "step=000002.ckpt", weights_only=True)
    torch.testing.assert_close(saved["state_dict"]["w"], checkpoint(2)["state_dict"]["w"], rtol=0, atol=0)
    manifest = json.loads(manifest_path(tmp_path / "step=000002.ckpt").read_text())
    assert manifest == {"global_step": 2, **file_digest(tmp_path / "step=000002.ckpt")}


def test_resume_auto_skips_what_a_failed_save_left_and_names_it(tmp_path, caplog):
    """Bug caught: completeness judged by a non-empty file (the old ``st_size > 0``): a cut-off step 8 with no manifest
    (the old writer's leftover), a step 6 shorter than its manifest, a step 5 of the right size with other bytes, and
    a step 7 temporary file from a killed save are all "newer" than the whole step 4, and each gets a warning."""
    for step in (4, 5, 6):
        save_file_checkpoint(checkpoint(step), tmp_path / f"step={step:06d}.ckpt")
    whole = (tmp_path / "step=000006.ckpt").read_bytes()
    (tmp_path / "step=000006.ckpt").write_bytes(whole[: len(whole) * 15 // 37])  # cut off, as in the issue
    five = bytearray((tmp_path / "step=000005.ckpt").read_bytes())
    five[-100] ^= 0xFF  # the same size, one byte differs: the hash tells
    (tmp_path / "step=000005.ckpt").write_bytes(bytes(five))
    (tmp_path / "step=000007.ckpt.tmp-12345").write_bytes(whole[:1000])
    (tmp_path / "step=000008.ckpt").write_bytes(whole[:1000])
    with caplog.at_level(logging.WARNING, logger="billa"):
        assert resolve_ckpt_path(None, "auto", tmp_path) == str(tmp_path / "step=000004.ckpt")
    for step, reason in [
        (8, "no step=000008.ckpt.manifest.json"),
        (7, "an unfinished save"),
        (6, f"holds {len(whole) * 15 // 37:,} bytes, the manifest records {len(whole):,}"),
        (5, "does not match its SHA-256"),
    ]:
        assert f"step={step:06d}.ckpt" in caplog.text and reason in caplog.text, (step, caplog.text)
    # the hash is checked up to a size (sizes only above it: an 80 GB ZeRO-3 checkpoint is not rehashed at resume)
    assert incomplete_reason(tmp_path / "step=000005.ckpt", hash_limit=0) is None
    # a checkpoint named in ckpt_path: one without a manifest is taken (an older billa's), a mismatched one is refused
    assert resolve_ckpt_path(str(tmp_path / "step=000008.ckpt"), None, tmp_path) == str(tmp_path / "step=000008.ckpt")
    with pytest.raises(FileNotFoundError, match=r"step=000006\.ckpt: not a complete checkpoint \(.* holds"):
        resolve_ckpt_path(str(tmp_path / "step=000006.ckpt"), None, tmp_path)


def zero_directory(root: Path, step: int) -> Path:
    """A DeepSpeed checkpoint directory as ``BillaDeepSpeedStrategy.save_checkpoint`` leaves it (2 ranks' files)."""
    final = root / f"step={step:06d}.ckpt"
    (final / "checkpoint").mkdir(parents=True)
    for rank in (0, 1):
        torch.save(
            checkpoint(10 * step + rank), final / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        )
    (final / "latest").write_text("checkpoint")
    files = {p.relative_to(final).as_posix(): file_digest(p) for p in sorted(final.rglob("*")) if p.is_file()}
    (final / DIRECTORY_MANIFEST).write_text(json.dumps({"global_step": step, "files": files}))
    (final / COMPLETE_MARKER).write_text(f"global_step={step}\n")
    return final


def test_zero_directory_with_a_cut_off_rank_file_is_skipped(tmp_path, caplog):
    """Bug caught: the COMPLETE marker trusted alone: a ZeRO-3 directory whose rank-1 shard was cut off (a copy to a
    full disk, a rank whose write failed) is resumed, and DeepSpeed fails at load or loads a cut-off state."""
    zero_directory(tmp_path, 4)
    broken = zero_directory(tmp_path, 8)
    shard = broken / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:5000])
    with caplog.at_level(logging.WARNING, logger="billa"):
        assert resolve_ckpt_path(None, "auto", tmp_path) == str(tmp_path / "step=000004.ckpt")
    assert "step=000008.ckpt: checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt holds 5,000 bytes" in caplog.text
    missing = zero_directory(tmp_path, 12)
    (missing / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert incomplete_reason(missing) == "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"
    with pytest.raises(FileNotFoundError, match=r"not a complete checkpoint \(checkpoint/zero_pp_rank_1.* holds"):
        resolve_ckpt_path(str(broken), None, tmp_path)


# The tiny model, a checkpoint every 2 steps on a disk with room for two: the save of step 6 meets a full disk.
# The resume is from step 4 of 6 on purpose: resumed before the schedule's middle (step 2), the run replays data today,
# a bug outside checkpoint writing: Lightning restores batch_progress.ready=2 and ends the epoch when ready reaches
# len(train_dataloader)=4 (the StreamSampler's rest of the stream), after 2 of the 4 remaining steps.
RUN = ["trainer.max_steps=6", "checkpoint.every_n_steps=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir, sample_tokenizer_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train_in_process(run_dir, cache_dir, *RUN)
    return run_dir


def test_resume_after_a_full_disk_reaches_the_same_losses(uninterrupted, tmp_path, cache_dir, monkeypatch):
    """A real Lightning run on a small disk: the step-6 save hits ENOSPC 15/37 in; ``resume=auto`` resumes step 4.

    Bug caught: the issue's cut-off ``step=000006.ckpt`` under its final name (resume then fails as an "untrusted
    checkpoint"), a checkpoint IO that is not the atomic one (Lightning's default: written in /tmp and moved), and a
    resume from the wrong step or data position (its losses differ from the uninterrupted run's).
    """
    run_dir = tmp_path / "run"
    saved = [uninterrupted / "checkpoints" / f"step={step:06d}.ckpt" for step in (2, 4)]
    # a file system with room for steps 2 and 4 with their manifests, and 15/37 of step 6 (the 15 of 37 MB)
    room = sum(p.stat().st_size + manifest_path(p).stat().st_size for p in saved) + saved[0].stat().st_size * 15 // 37
    with monkeypatch.context() as patch:
        SmallDisk(run_dir / "checkpoints", room).install(patch)
        with pytest.raises(OSError) as failure:
            train_in_process(run_dir, cache_dir, *RUN)
    assert failure.value.errno == errno.ENOSPC
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "last.ckpt",
        "step=000002.ckpt",
        "step=000002.ckpt.manifest.json",
        "step=000004.ckpt",
        "step=000004.ckpt.manifest.json",
    ]
    resumed = train_cli(run_dir, cache_dir, *RUN, "resume=auto")  # the job restarted, as after a real failure
    output = resumed.stdout + resumed.stderr
    assert f"Resuming from {checkpoints / 'step=000004.ckpt'}" in output and "Skipping" not in output
    before, after = logged(uninterrupted, "train/loss"), logged(run_dir, "train/loss")
    assert sorted(before) == sorted(after) == list(range(6))  # CSV step = optimizer step - 1
    for step in range(6):
        assert after[step] == pytest.approx(before[step], rel=1e-6), (step, after, before)
    resumed_csv = sorted((run_dir / "csv").rglob("metrics.csv"))[-1]
    resumed_steps = {int(row["step"]) for row in csv.DictReader(resumed_csv.open()) if row.get("train/loss")}
    assert resumed_steps == {4, 5}  # optimizer steps 5 and 6: the resumed run's own
    assert find_resume_checkpoint(checkpoints) == str(checkpoints / "step=000006.ckpt")


def test_zero_three_save_records_every_rank_file(zero3_accumulation_run):
    """The real ZeRO-3 save (2 ranks over gloo): ``MANIFEST.json`` lists every file of the directory, both ranks'
    shards included, with the size and SHA-256 they have on disk.

    Bug caught: hashes not gathered from the other ranks (only rank 0's share listed, so a cut-off rank-1 shard would
    pass), a listing taken before every rank finished, or a manifest written after the rename.
    """
    final = zero3_accumulation_run / "checkpoints" / "step=000008.ckpt"
    manifest = json.loads((final / DIRECTORY_MANIFEST).read_text())
    on_disk = sorted(
        p.relative_to(final).as_posix()
        for p in final.rglob("*")
        if p.is_file() and p.name not in (DIRECTORY_MANIFEST, COMPLETE_MARKER)
    )
    assert manifest["global_step"] == 8 and sorted(manifest["files"]) == on_disk
    assert {f"checkpoint/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)} <= set(on_disk)
    for name, entry in manifest["files"].items():
        assert entry == file_digest(final / name), name
    assert incomplete_reason(final, hash_limit=None) is None
