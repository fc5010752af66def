"""Shared fixtures: one sample corpus + tokenizer per test session, Hydra composition of the real config tree."""

from __future__ import annotations

import os
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

pytest_plugins = ["tests.openai_server"]  # the openai_server fixture: a local OpenAI-compatible HTTP server

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A billa cache (sample corpus + sample tokenizer) built once per session."""
    path = tmp_path_factory.mktemp("billa-cache")
    os.environ["BILLA_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def sample_corpus(cache_dir) -> Path:
    from billa.data.sample import build_sample_corpus

    root = cache_dir / "sample" / "corpus"
    build_sample_corpus(root)
    return root


@pytest.fixture(scope="session")
def sample_tokenizer_dir(cache_dir, sample_corpus) -> str:
    from billa.tokenizer.sample import sample_tokenizer

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
