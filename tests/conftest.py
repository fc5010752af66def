"""Shared fixtures: one sample corpus + tokenizer per test session, Hydra composition of the real config tree."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

# Offline everywhere, and one compiled-extension cache for the whole run (DeepSpeed ops compile once).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "billa-torch-extensions"))

from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from .helpers import ROOT, run_door  # noqa: E402

pytest_plugins = ["tests.openai_server"]  # the openai_server fixture: a local OpenAI-compatible HTTP server

CONF = ROOT / "conf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A billa cache (sample corpus + sample tokenizer) built once per session."""
    path = tmp_path_factory.mktemp("billa-cache")
    os.environ["BILLA_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def sample_corpus(cache_dir) -> Path:
    from billa.sample.corpus import build_sample_corpus

    root = cache_dir / "sample" / "corpus"
    build_sample_corpus(root)
    return root


@pytest.fixture(scope="session")
def sample_tokenizer_dir(cache_dir, sample_corpus) -> str:
    from billa.sample.tokenizer import sample_tokenizer

    return sample_tokenizer(cache_dir / "sample")


def compose_train(overrides: list[str], output_dir: Path | None = None, cache: Path | None = None) -> DictConfig:
    """Compose ``conf/train.yaml`` as ``python train.py <overrides>`` would, with output/cache dirs set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir or "/nonexistent-output")
        if cache is not None:
            cfg.cache_dir = str(cache)
    return cfg


@pytest.fixture
def compose():
    return compose_train


def tiny_parameter_count(tokenizer_dir: str) -> int:
    """Parameters of model=tiny with the tokenizer of ``tokenizer_dir`` (computed on the meta device)."""
    from transformers import AutoTokenizer

    from billa.model.builders import count_parameters

    cfg = compose_train([])
    return count_parameters(cfg.model.architecture, len(AutoTokenizer.from_pretrained(tokenizer_dir)))


# The schedule every run of the equivalence matrix shares (tests/test_equivalence.py, tests/test_zero3.py): the tiny
# model, global batch 16, 8 optimizer steps, validation at steps 0, 4 and 8, a checkpoint every 4 steps.
SHORT_RUN = [
    "logger=csv",
    "trainer.max_steps=8",
    "val_every_n_steps=4",
    "checkpoint.every_n_steps=4",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_steps=1",
    "data.val_max_records=8",
    "trainer.enable_progress_bar=false",
]
QUICK_PIPELINE = [  # a pipeline's every stage: 3 steps, small validation, CSV metrics, no evaluation tasks
    "logger=csv",
    "pipeline.evaluate_tasks=[]",
    "trainer.max_steps=3",
    "val_every_n_steps=3",
    "checkpoint.every_n_steps=3",
    "scheduler.warmup_steps=1",
    "data.val_max_records=4",
    "trainer.enable_progress_bar=false",
]
ZERO3 = ["hardware=cpu_zero3"]  # 2 processes over gloo, the real DeepSpeed ZeRO-3 engine


def train_cli(run_dir: Path, cache_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python train.py <SHORT_RUN> <overrides>`` in a subprocess, as a user runs it (needed for several ranks)."""
    env = {"BILLA_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore"}
    result = run_door("train.py", *SHORT_RUN, f"hydra.run.dir={run_dir}", *overrides, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_in_process(run_dir: Path, cache_dir: Path, *overrides: str) -> dict:
    """``billa.train.run`` on ``SHORT_RUN + overrides`` in this process (one rank only)."""
    from billa.train import run

    return run(compose_train([*SHORT_RUN, *overrides], output_dir=run_dir, cache=cache_dir))


def logged(run_dir: Path, metric: str) -> dict[int, float]:
    """``metric`` per logged step from every CSV version of the run (a resumed run appends a version).

    Lightning's CSV ``step`` of a training metric is the optimizer step it belongs to minus one; validation after
    step N is logged at N - 1 as well, the step-0 baseline at 0.
    """
    out = {}
    for path in sorted((run_dir / "csv").rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get(metric):
                out[int(row["step"])] = float(row[metric])
    return out


@pytest.fixture(scope="session")
def zero3_accumulation_run(tmp_path_factory, cache_dir, sample_tokenizer_dir) -> Path:
    """2 ranks x micro batch 4 x accumulation 2 under ZeRO-3 (run D of the equivalence matrix; test_zero3's run).

    Checkpoints after steps 4 and 8, of which ``checkpoint.keep_last=1`` keeps the last.
    """
    run_dir = tmp_path_factory.mktemp("zero3-D")
    train_cli(run_dir, cache_dir, *ZERO3, "hardware.micro_batch_size=4", "checkpoint.keep_last=1")
    return run_dir
