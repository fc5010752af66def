"""The fault matrix (issue 23): ``python train.py`` killed with SIGKILL at each point where it writes something that a
rerun reads, then the plain rerun, which must end where a run that never failed ends.

Each test starts the real entry point in its own process group, polls the file system for the fault point (a file
or directory that exists only while the write is under way), kills the whole group there (every rank, as a lost
node), and reruns the same command with ``resume=auto``. A run that finishes before its fault point appears fails
the test: a fault that was not injected proves nothing.

The cells tested elsewhere, not repeated here:

- kill -9 during a shuffled source's tokenisation pass: ``tests/test_data_pipeline.py::test_a_killed_tokenisation_
  pass_resumes_without_redoing_finished_shards``; a killed pass's temporary directories: ``tests/test_bad_input.py``.
  (A stream's tokenisation, which runs while training runs, is killed here.)
- ENOSPC during a single-file save, then ``resume=auto`` to the uninterrupted losses:
  ``tests/test_checkpoint_atomic.py::test_resume_after_a_full_disk_reaches_the_same_losses``.
- kill -9 of a ZeRO-3 job after a complete checkpoint: ``tests/test_rehearsal.py`` (7B shapes, 2 ranks).
- concurrent tokenisation passes on one cold cache: ``tests/test_cache_concurrency.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from billa.data.stream import STREAM_FORMAT

from .conftest import QUICK_PIPELINE, SHORT_RUN, ZERO3, logged, train_cli
from .helpers import ROOT

pytestmark = pytest.mark.slow

# Checkpoints after steps 2, 4 and 6 (as tests/test_checkpoint_atomic.py's full-disk run): a kill during step 4's
# save resumes from step 2, before the middle of the run, the harder case for the data position.
RUN = ["trainer.max_steps=6", "checkpoint.every_n_steps=2"]
# conftest's zero3_accumulation_run (2 ranks x micro batch 4 x accumulation 2, checkpoints after steps 4 and 8)
ZERO3_RUN = [*ZERO3, "hardware.micro_batch_size=4", "checkpoint.keep_last=1"]
POLL_S = 0.002  # a 37 MB checkpoint of model=tiny takes ~0.1 s to write, hash and sync: polled ~50 times


def _env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "BILLA_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore"}


def _start(run_dir: Path, cache_dir: Path, *overrides: str, log: Path) -> subprocess.Popen:
    """``python train.py <SHORT_RUN> <overrides>`` (train_cli's command) in its own process group, output in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "train.py", *SHORT_RUN, f"hydra.run.dir={run_dir}", *overrides],
            cwd=ROOT,
            env=_env(cache_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the ranks it spawns join the group: one kill takes the whole job
        )


def _kill_when(proc: subprocess.Popen, fault_point: Callable[[], Path | None], log: Path, timeout: float = 400) -> Path:
    """SIGKILL ``proc``'s process group as soon as ``fault_point()`` finds its path; that path.

    Fails if the process exits first (the fault was never injected) or the point never comes within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    try:
        while (found := fault_point()) is None:
            if proc.poll() is not None:
                pytest.fail(f"exited ({proc.returncode}) before the fault point:\n{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"no fault point within {timeout} s"
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the kill came too late: exit code {proc.returncode}"
    return found


def _first(directory: Path, pattern: str) -> Callable[[], Path | None]:
    def find() -> Path | None:
        return next(iter(directory.glob(pattern)), None) if directory.is_dir() else None

    return find


def _assert_same_losses(run_dir: Path, reference: Path, steps: int) -> None:
    expected, got = logged(reference, "train/loss"), logged(run_dir, "train/loss")
    assert sorted(expected) == sorted(got) == list(range(steps))  # CSV step = optimizer step - 1
    for step in range(steps):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), (step, got, expected)


def _weights(export_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(export_dir.glob("*.safetensors")):
        state.update(load_file(path))
    assert state, f"no weights in {export_dir}"
    return state


def _assert_same_weights(export_dir: Path, reference: Path) -> None:
    got, expected = _weights(export_dir), _weights(reference)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir, sample_tokenizer_dir) -> Path:
    """``RUN`` from start to export without a fault: the losses and export every rerun must reach."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train_cli(run_dir, cache_dir, *RUN)
    return run_dir


def test_kill_during_stream_tokenisation(uninterrupted, tmp_path, cache_dir):
    """SIGKILL once the feeder has finished its first stream file on a cold ``data.token_cache_dir`` (the others
    are not tokenised yet); the plain rerun keeps that file's pieces as they are, tokenises the rest and logs the
    uninterrupted run's losses and export (whose token cache another process built).

    Bug caught: a rerun that redoes finished stream files, or trusts a piece the kill cut off (a marker without its
    arrow file, an ``.arrow.tmp-`` taken for a piece), or reads a file's stream from the wrong line."""
    tokens, run_dir, log = tmp_path / "tokens", tmp_path / "run", tmp_path / "killed.log"
    cold = f"data.token_cache_dir={tokens}"
    proc = _start(run_dir, cache_dir, *RUN, cold, log=log)
    done = _kill_when(proc, _first(tokens, f"*/*/{STREAM_FORMAT}/*/done.json"), log)
    stream_files = [d for d in done.parents[1].iterdir() if d.is_dir()]
    finished = {
        piece: piece.stat().st_mtime_ns
        for d in stream_files
        if (d / "done.json").is_file()
        for piece in d.glob("*.arrow")
    }
    assert finished, "no finished piece survived the kill"
    assert not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").iterdir())
    rerun = train_cli(run_dir, cache_dir, *RUN, cold, "resume=auto")
    assert rerun.returncode == 0
    for piece, mtime in finished.items():
        assert piece.stat().st_mtime_ns == mtime, f"{piece} was tokenised again"
    assert not list(tokens.rglob("*.tmp-*")), "temporary files left in the token cache"
    _assert_same_losses(run_dir, uninterrupted, 6)
    _assert_same_weights(run_dir / "hf", uninterrupted / "hf")


def test_kill_during_checkpoint_file_save(uninterrupted, tmp_path, cache_dir):
    """SIGKILL while ``step=000004.ckpt`` is being written (its ``.tmp-<pid>`` file exists); the rerun with
    ``resume=auto`` continues from step 2 to the uninterrupted run's losses and export.

    Bug caught: a half-written file under the checkpoint's own name (resume=auto would pick it and fail, or resume
    from garbage), a leftover ``.tmp-`` file taken for a checkpoint, a resume from the wrong data position."""
    run_dir, log = tmp_path / "run", tmp_path / "killed.log"
    proc = _start(run_dir, cache_dir, *RUN, log=log)
    partial = _kill_when(proc, _first(run_dir / "checkpoints", "step=000004.ckpt.tmp-*"), log)
    assert not (run_dir / "checkpoints" / "step=000004.ckpt").exists(), "a half-written save under its final name"
    assert partial.exists() and not (run_dir / "hf").exists()
    resumed = train_cli(run_dir, cache_dir, *RUN, "resume=auto")
    assert f"Resuming from {run_dir / 'checkpoints' / 'step=000002.ckpt'}" in resumed.stdout + resumed.stderr
    _assert_same_losses(run_dir, uninterrupted, 6)
    _assert_same_weights(run_dir / "hf", uninterrupted / "hf")


def test_kill_during_zero3_save(zero3_accumulation_run, tmp_path, cache_dir):
    """SIGKILL of both ZeRO-3 ranks while ``step=000008.ckpt.partial`` is being written; the rerun with
    ``resume=auto`` continues from step 4 to conftest's uninterrupted ZeRO-3 run's losses and export.

    Bug caught: an unfinished DeepSpeed directory that looks complete (resume=auto would load half the rank
    files), ``keep_last`` deleting the last whole checkpoint before the new one is complete, a rerun that trips
    over the ``.partial`` directory left behind."""
    run_dir, log = tmp_path / "run", tmp_path / "killed.log"
    proc = _start(run_dir, cache_dir, *ZERO3_RUN, log=log)
    _kill_when(proc, _first(run_dir / "checkpoints", "step=000008.ckpt.partial"), log)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step=000004.ckpt" / "COMPLETE").is_file()  # the last whole checkpoint survived
    assert not (checkpoints / "step=000008.ckpt").exists() and not (run_dir / "hf").exists()
    resumed = train_cli(run_dir, cache_dir, *ZERO3_RUN, "resume=auto")
    assert f"Resuming from {checkpoints / 'step=000004.ckpt'}" in resumed.stdout + resumed.stderr
    _assert_same_losses(run_dir, zero3_accumulation_run, 8)
    _assert_same_weights(run_dir / "hf", zero3_accumulation_run / "hf")


def test_kill_during_export(uninterrupted, tmp_path, cache_dir):
    """SIGKILL while the export is assembled in ``hf.tmp``; the rerun with ``resume=auto`` restores the final
    checkpoint, trains nothing more and writes an ``hf/`` equal to the uninterrupted run's.

    Bug caught: a half-written ``hf/`` that loads (a later stage or a user would start from it), a leftover
    ``hf.tmp`` that blocks the next export, a rerun that retrains or cannot resume from a checkpoint at max_steps."""
    run_dir, log = tmp_path / "run", tmp_path / "killed.log"
    proc = _start(run_dir, cache_dir, *RUN, log=log)
    _kill_when(proc, lambda: run_dir / "hf.tmp" if (run_dir / "hf.tmp").exists() else None, log)
    assert not (run_dir / "hf").exists()
    resumed = train_cli(run_dir, cache_dir, *RUN, "resume=auto")
    assert f"Resuming from {run_dir / 'checkpoints' / 'step=000006.ckpt'}" in resumed.stdout + resumed.stderr
    _assert_same_losses(run_dir, uninterrupted, 6)  # every step logged once, by the killed run
    assert not (run_dir / "hf.tmp").exists()
    _assert_same_weights(run_dir / "hf", uninterrupted / "hf")


# The pipeline cut to two stages of 3 steps each (stage 1 -> stage 2 is the hand-off), no evaluation afterwards.
PIPELINE = [
    "pipeline=billa",
    "pipeline.steps=[{name:stage1,stage:pretrain},{name:stage2,stage:task_mix}]",
    "pipeline.evaluate=false",
    *QUICK_PIPELINE,
]


def _pipeline_args(store: Path, out: Path) -> list[str]:
    return ["train.py", *PIPELINE, f"pipeline.store_dir={store}", f"hydra.run.dir={out}"]


def _pipeline_summary(out: Path) -> dict:
    return json.loads((out / "pipeline.json").read_text())


def test_kill_during_pipeline_stage_handoff(tmp_path, cache_dir, sample_tokenizer_dir):
    """SIGKILL of ``python train.py pipeline=billa`` once stage 1 is finished and stage 2 has started from its
    export; the same command again reuses stage 1 and ends with the final export of a pipeline that never stopped.

    Bug caught: a killed pipeline that retrains its finished stage, a stage 2 started from a missing or partial
    stage 1 export, a half-trained stage 2 marked finished."""
    env = _env(cache_dir)
    whole = subprocess.run(
        [sys.executable, *_pipeline_args(tmp_path / "store-whole", tmp_path / "whole")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    store, out, log = tmp_path / "store", tmp_path / "out", tmp_path / "killed.log"
    args = _pipeline_args(store, out)
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    stage2 = _kill_when(proc, _first(store, "stage2-*"), log)
    (stage1,) = store.glob("stage1-*")
    assert (stage1 / "DONE.json").is_file() and (stage1 / "hf").is_dir()
    assert not (stage2 / "DONE.json").exists()
    rerun = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary, reference = _pipeline_summary(out), _pipeline_summary(tmp_path / "whole")
    assert summary["status"] == reference["status"] == "done"
    first, second = summary["steps"][1], summary["steps"][2]
    assert first["reused"] and Path(first["dir"]) == stage1  # stage 1 was not trained again
    assert not second["reused"] and Path(second["dir"]) == stage2 and (stage2 / "DONE.json").is_file()
    assert second["global_step"] == reference["steps"][2]["global_step"] == 3
    _assert_same_weights(Path(second["export_dir"]), Path(reference["steps"][2]["export_dir"]))


def test_two_concurrent_runs_share_a_cold_token_cache(uninterrupted, tmp_path, cache_dir):
    """Two ``python train.py`` at once, different run directories, one cold ``data.token_cache_dir``: both exit 0
    and log the losses of a run alone (whose cache was built by another process before).

    Bug caught: two runs tokenising into one cache overwriting each other's shards, one reading the other's
    half-written shard, or waiting forever on its claim (tokenisation itself: tests/test_cache_concurrency.py)."""
    tokens = tmp_path / "tokens"
    runs = [tmp_path / "a", tmp_path / "b"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    shared = f"data.token_cache_dir={tokens}"
    procs = [_start(run, cache_dir, *RUN, shared, log=log) for run, log in zip(runs, logs, strict=True)]
    try:
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log.read_text()[-3000:]
    for run in runs:
        _assert_same_losses(run, uninterrupted, 6)
    assert any(tokens.iterdir())  # the runs did tokenise into the shared cache
