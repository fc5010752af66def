"""One error path: every error billa raises on purpose ends an entry point with one ``billa: error:`` block naming the
file or key, exit status 2 and the stack trace in the run's log file (``HYDRA_FULL_ERROR=1`` prints it instead).

The subprocess tests stop before any training step: the bad data file is a validation file (read in
``prepare_data``), and untrusted weights are refused before anything is unpickled.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from billa.utils.errors import BillaError, exit_on_error, user_error_in

from .helpers import run_door, tiny_llama


class _RunsCode:
    """Unpickling this calls ``os.system`` (the shape of a crafted checkpoint); saving it runs nothing."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _blocks(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("billa: error:")]


def assert_billa_error(result: subprocess.CompletedProcess, log: Path, *named: str) -> None:
    """Exit 2, exactly one ``billa: error:`` block naming each of ``named``, no stack trace on the terminal, the stack
    trace (and the same message) in ``log``."""
    assert result.returncode == 2, result.stderr[-3000:]
    blocks = _blocks(result.stderr)
    assert len(blocks) == 1, result.stderr[-3000:]
    for text in named:
        assert text in blocks[0], blocks[0]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "Weights only load failed" not in result.stderr and "will likely succeed" not in result.stderr
    assert f"stack trace in {log}" in result.stderr
    logged = log.read_text()
    assert "Traceback (most recent call last)" in logged and blocks[0] in logged


@pytest.fixture
def bad_val_file(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "meta": {"pile_set_name": "Pile-CC"}}\n{"text": broken\n')
    return path


@pytest.fixture
def crafted_model_dir(tmp_path) -> tuple[Path, Path]:
    """A HF model directory (config.json) whose only weights, ``pytorch_model.bin``, run a command when unpickled."""
    import torch

    model_dir, marker = tmp_path / "model", tmp_path / "code-ran"
    tiny_llama(16, seed=0).config.save_pretrained(model_dir)
    torch.save({"model.norm.weight": torch.ones(32), "hook": _RunsCode(marker)}, model_dir / "pytorch_model.bin")
    return model_dir, marker


def _train(tmp_path: Path, cache_dir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    run = ["logger=none", f"hydra.run.dir={tmp_path / 'run'}", *args]
    return run_door("train.py", *run, env={"BILLA_CACHE_DIR": str(cache_dir), **(env or {})}, timeout=300)


# ---- in-process: what the error path recognises and where the stack trace goes ----------------------------------
def test_user_error_in_finds_billa_errors_through_wrappers_and_leaves_bugs():
    """Bugs caught: a DataFormatError / UntrustedCheckpointError (not ConfigErrors) or a data-layer ``ValueError``
    naming ``data.sources.*`` printed as a traceback; a wrapped error (hydra.utils.instantiate, ``raise ... from``)
    missed; a bug (a KeyError, a library ValueError) swallowed into a ``billa: error:`` block."""
    from hydra.errors import InstantiationException

    from billa.config import ConfigError
    from billa.data.readers import DataFormatError
    from billa.distributed.safe_load import UntrustedCheckpointError

    for err in (ConfigError("x"), DataFormatError("f.jsonl:2: bad"), UntrustedCheckpointError("ckpt_path=x")):
        assert isinstance(err, BillaError) and user_error_in(err) is err
    empty = ValueError("data.sources.en.val: no usable examples in /x/val.jsonl")
    wrapped = InstantiationException("Error in call to target")
    wrapped.__cause__ = empty
    assert user_error_in(wrapped) is empty
    assert user_error_in(FileNotFoundError("data.sources.en.train: no file matches '/x/*.jsonl'")) is not None
    assert user_error_in(KeyError("data.objectives.text='nope' (needed by source 'en')")) is not None
    assert user_error_in(FileNotFoundError("ckpt_path=/x: not a complete checkpoint")) is not None
    assert user_error_in(ValueError("`progress`='loud': expected one of bar, log")) is not None
    assert user_error_in(FileNotFoundError("model_path is not set and no export matches 'outputs/*/*/hf'")) is not None
    bugs = (
        KeyError("bug"),
        ValueError("too many values to unpack (expected 2)"),
        ValueError("Expected tensor for argument #1 'indices'"),
        FileNotFoundError(2, "No such file or directory"),
        RuntimeError("data.sources.en: a RuntimeError is never the user's"),
    )
    for bug in bugs:
        assert user_error_in(bug) is None, bug


def test_exit_on_error_prints_one_block_and_logs_the_trace_only_to_the_file(tmp_path, capsys, monkeypatch):
    """Bugs caught: the stack trace lost (not in the run's log) or printed on the terminal (a console handler);
    a KeyError's message printed with quotes; HYDRA_FULL_ERROR=1 not showing the stack trace."""
    from billa.data.readers import DataFormatError

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    log_file = tmp_path / "train.log"
    root = logging.getLogger()
    handlers = [logging.FileHandler(log_file), logging.StreamHandler()]  # as Hydra's job logging: file + console
    for handler in handlers:
        root.addHandler(handler)
    try:
        with pytest.raises(SystemExit) as stop, exit_on_error():
            raise DataFormatError("/data/en.jsonl:7: not valid JSON (Expecting value)")
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("billa: error: /data/en.jsonl:7: not valid JSON") and "Traceback" not in err
        assert f"stack trace in {log_file}" in err
        assert "Traceback (most recent call last)" in log_file.read_text()

        with pytest.raises(SystemExit), exit_on_error():
            raise KeyError("data.objectives.text='nope': known objectives: ['causal_lm']")
        assert capsys.readouterr().err.startswith("billa: error: data.objectives.text='nope'")

        with pytest.raises(RuntimeError), exit_on_error():  # a bug propagates; its trace is still in the log
            raise RuntimeError("a bug")
        assert "RuntimeError: a bug" in log_file.read_text()

        monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
        with pytest.raises(DataFormatError), exit_on_error():
            raise DataFormatError("x")
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def test_chat_questions_file_errors_name_the_key_file_and_line(tmp_path):
    """Bug caught: a malformed ``questions_file`` line ending chat.py with json's bare 'Expecting value' traceback
    (no file, no line) instead of a billa error naming ``questions_file``, the file and the line."""
    from billa.chat import _read_prompts

    path = tmp_path / "questions.jsonl"
    path.write_text('{"text": "hi"}\n{"text": broken}\n')
    with pytest.raises(BillaError, match=rf"questions_file={path}:2: not valid JSON"):
        _read_prompts(str(path))
    path.write_text('plain question\n{"text": ["not", "a", "string"]}\n')
    with pytest.raises(BillaError, match=rf"questions_file={path}:2: expected a jsonl record"):
        _read_prompts(str(path))


def test_torch_weights_only_failure_becomes_billa_message(tmp_path):
    """Bug caught: an old-format (non-zip) ``.bin`` that the pre-check cannot read reaching the user as torch's
    'Weights only load failed ... Re-running with weights_only=False will likely succeed' advice."""
    import torch
    from transformers import AutoModelForCausalLM

    from billa.distributed.safe_load import UntrustedCheckpointError, pretrained_loading

    model_dir, marker = tmp_path / "model", tmp_path / "code-ran"
    tiny_llama(16, seed=0).config.save_pretrained(model_dir)
    state = {"model.norm.weight": torch.ones(32), "hook": _RunsCode(marker)}
    torch.save(state, model_dir / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(UntrustedCheckpointError) as err, pretrained_loading(model_dir, "init_from"):
        AutoModelForCausalLM.from_pretrained(model_dir)
    message = str(err.value)
    assert message.startswith(f"init_from={model_dir}: {model_dir / 'pytorch_model.bin'} needs ['posix.system']")
    assert "Weights only load failed" not in message and not marker.exists()


# ---- the entry points, as a user runs them -------------------------------------------------------------------------
def test_malformed_data_file_is_one_block_and_exit_2(tmp_path, sample_tokenizer_dir, cache_dir, bad_val_file):
    """Bug caught: a DataFormatError raised inside Lightning's prepare_data ending train.py with ~30 lines of
    traceback and exit 1 (it was not a ConfigError, the only type the door turned into a message)."""
    result = _train(tmp_path, cache_dir, f"data.sources.en.val={bad_val_file}")
    assert_billa_error(result, tmp_path / "run" / "train.log", f"{bad_val_file}:2: not valid JSON")


def test_hydra_full_error_still_shows_the_trace(tmp_path, sample_tokenizer_dir, cache_dir, bad_val_file):
    """Bug caught: the error path swallowing the stack trace even when HYDRA_FULL_ERROR=1 asks for it."""
    result = _train(tmp_path, cache_dir, f"data.sources.en.val={bad_val_file}", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "DataFormatError" in result.stderr and f"{bad_val_file}:2: not valid JSON" in result.stderr


def test_missing_data_file_is_one_block_and_exit_2(tmp_path, sample_tokenizer_dir, cache_dir):
    """Bug caught: the data layer's plain FileNotFoundError ('data.sources.en.val: no file matches ...') ending the
    run with a traceback because it is not one of billa's exception classes."""
    result = _train(tmp_path, cache_dir, f"data.sources.en.val={tmp_path / 'gone.jsonl'}")
    assert_billa_error(result, tmp_path / "run" / "train.log", "data.sources.en.val", "gone.jsonl")


def test_multirun_job_with_bad_data_prints_the_block(tmp_path, sample_tokenizer_dir, cache_dir, bad_val_file):
    """Bug caught: a sweep's failing job printing Hydra's 'Error executing job' and a traceback (exit 1)."""
    sweep = tmp_path / "sweep"
    result = run_door(
        "train.py",
        "-m",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
        f"data.sources.en.val={bad_val_file}",
        env={"BILLA_CACHE_DIR": str(cache_dir)},
        timeout=300,
    )
    assert_billa_error(result, sweep / "0" / "train.log", f"{bad_val_file}:2: not valid JSON")


def test_untrusted_resume_checkpoint_is_one_block(tmp_path, sample_tokenizer_dir, cache_dir):
    """Bug caught: UntrustedCheckpointError (resume from someone else's checkpoint) ending train.py with a traceback;
    or the crafted pickle running."""
    import torch

    ckpt, marker = tmp_path / "step=000004.ckpt", tmp_path / "code-ran"
    torch.save({"state_dict": {}, "global_step": 4, "hook": _RunsCode(marker)}, ckpt)
    result = _train(tmp_path, cache_dir, f"ckpt_path='{ckpt}'")
    assert_billa_error(result, tmp_path / "run" / "train.log", "ckpt_path=", "posix.system", "trust_checkpoint=true")
    assert not marker.exists()


@pytest.mark.slow  # ~70 s on a busy machine: the refusal comes in configure_model, after the data is prepared
def test_untrusted_init_from_weights_are_billa_message(tmp_path, sample_tokenizer_dir, cache_dir, crafted_model_dir):
    """Bug caught: init_from a directory with crafted ``.bin`` weights reaching the user as torch's 'Weights only load
    failed ... Re-running with weights_only=False will likely succeed' traceback."""
    model_dir, marker = crafted_model_dir
    result = _train(tmp_path, cache_dir, f"init_from={model_dir}")
    assert_billa_error(result, tmp_path / "run" / "train.log", f"init_from={model_dir}", "posix.system", "safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("door,log_name", [("evaluate.py", "evaluate.log"), ("chat.py", "chat.log")])
def test_untrusted_model_path_is_billa_message(door, log_name, tmp_path, cache_dir, crafted_model_dir):
    """Bug caught: evaluate.py / chat.py loading a model directory with crafted ``.bin`` weights and showing torch's
    weights_only advice (and a traceback) instead of naming ``model_path`` and the file."""
    model_dir, marker = crafted_model_dir
    args = [f"model_path={model_dir}", f"hydra.run.dir={tmp_path / 'run'}"]
    args += ["task=ppl"] if door == "evaluate.py" else ["questions=[hi]"]
    result = run_door(door, *args, env={"BILLA_CACHE_DIR": str(cache_dir)}, timeout=300)
    expected = (f"model_path={model_dir}", f"{model_dir / 'pytorch_model.bin'} needs ['posix.system']")
    assert_billa_error(result, tmp_path / "run" / log_name, *expected)
    assert not marker.exists()


def test_untrusted_zero_checkpoint_in_convert_is_one_block(tmp_path):
    """Bug caught: convert.py refusing a crafted ZeRO shard with a traceback (exit 1) instead of the block."""
    import torch

    ckpt, marker = tmp_path / "step=000004.ckpt", tmp_path / "code-ran"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("")  # a finished save, as billa marks one
    optim = {"optimizer_state_dict": {"zero_stage": 3, "hook": _RunsCode(marker)}}
    torch.save(optim, ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    args = [f"op.checkpoint='{ckpt}'", f"op.out_dir={tmp_path / 'hf'}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_door("convert.py", *args, timeout=300)
    assert_billa_error(result, tmp_path / "run" / "convert.log", "op.checkpoint=", "op.trust_checkpoint=true")
    assert not marker.exists() and not (tmp_path / "hf").exists()
