"""Secrets never reach a logged config."""

from __future__ import annotations

from billa.train import build_logger
from billa.utils.secrets import REDACTED, redact


def test_redact_secret_keys_but_not_tokenizer_settings():
    config = {
        "openai": {"api_key": "sk-123", "base_url": "http://127.0.0.1:8000/v1"},
        "hf_token": "hf_abc",
        "WANDB_API_KEY": "w",
        "data": {"token_cache_dir": "/c", "tokenizer": {"path": "/t"}, "max_seq_length": 1024},
        "list": [{"password": "p"}, "plain"],
        "empty_secret": None,
    }
    clean = redact(config)
    assert clean["openai"] == {"api_key": REDACTED, "base_url": "http://127.0.0.1:8000/v1"}
    assert clean["hf_token"] == clean["WANDB_API_KEY"] == REDACTED
    assert clean["data"] == config["data"]
    assert clean["list"] == [{"password": REDACTED}, "plain"]
    assert clean["empty_secret"] is None
    assert config["openai"]["api_key"] == "sk-123"  # the original is untouched


def test_logged_hyperparameters_are_redacted(compose, tmp_path):
    from omegaconf import open_dict

    cfg = compose(["logger=csv"], output_dir=tmp_path)
    with open_dict(cfg):
        cfg.openai = {"api_key": "sk-secret-value"}
    logger = build_logger(cfg)
    logger.save()
    hparams = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "sk-secret-value" not in hparams and "api_key: '***'" in hparams
