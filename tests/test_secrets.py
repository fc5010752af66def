"""Secrets never reach a logged config."""

from __future__ import annotations

from billa.train import build_logger
from billa.utils.secrets import REDACTED, redact

from .helpers import tiny_module


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


def test_redact_by_value_and_header_names():
    """Bug caught: redaction by key name only, so a key under an unrelated name or inside a header value leaks."""
    env = {"OPENAI_API_KEY": "sk-live-0123456789", "HF_TOKEN": "hf_abcdefghij", "WANDB_MODE": "offline"}
    from billa.utils.secrets import secret_values

    secrets = secret_values(env)
    assert secrets == ["sk-live-0123456789", "hf_abcdefghij"]  # WANDB_MODE is not secret-bearing
    config = {
        "judge": {"extra": "sk-live-0123456789", "headers": {"Authorization": "Bearer x", "X-Api-Key": "k"}},
        "hub": {"url": "https://u:hf_abcdefghij@example.org"},
        "openai_key": "anything",
        "model": {"architecture": {"num_key_value_heads": 32}, "name": "offline"},
    }
    clean = redact(config, secrets)
    assert clean["judge"] == {"extra": REDACTED, "headers": {"Authorization": REDACTED, "X-Api-Key": REDACTED}}
    assert clean["hub"]["url"] == REDACTED and clean["openai_key"] == REDACTED
    assert clean["model"] == config["model"]  # num_key_value_heads and short env values are not secrets


def test_module_hyperparameters_and_checkpoints_are_redacted(compose, tmp_path, monkeypatch):
    """Bug caught: Lightning logging the module's own save_hyperparameters (``+model.hf_token=...``) unredacted to
    hparams.yaml / W&B, and pickling it into every checkpoint; a key under an unrelated name
    (``${oc.env:OPENAI_API_KEY}``) reaching the logged config."""
    import torch
    from torch.utils.data import DataLoader

    from billa.config import plan_hardware
    from billa.data.collate import PadCollator
    from billa.train import build_trainer

    monkeypatch.setenv("BILLA_TEST_API_KEY", "sk-test-0123456789")
    overrides = ["logger=csv", "trainer.max_steps=1", "checkpoint.every_n_steps=1", "validate_at_start=false"]
    overrides += ["+model.hf_token=hf_valuesecret123", "+judge.endpoint_option=${oc.env:BILLA_TEST_API_KEY}"]
    cfg = compose([*overrides, "trainer.enable_progress_bar=false"], output_dir=tmp_path)
    hardware = plan_hardware(cfg)
    plan = hardware.batch
    module = tiny_module(
        cfg.model, 64, optimizer=cfg.optimizer, scheduler=cfg.scheduler, configure=False, validate_at_start=False
    )
    items = [{"input_ids": [1, 5, 9, 2], "labels": [1, 5, 9, 2], "source": "en"}] * plan.global_size
    loader = DataLoader(items, batch_size=plan.micro_size, collate_fn=PadCollator(0))
    trainer = build_trainer(cfg, hardware, 64, cfg.data.max_seq_length)
    trainer.fit(module, train_dataloaders=loader)
    logged = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "hf_valuesecret123" not in logged and "sk-test-0123456789" not in logged
    assert "hf_token: '***'" in logged and "endpoint_option: '***'" in logged
    ckpt = next((tmp_path / "checkpoints").glob("step=*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert (
        saved["model"]["hf_token"] == REDACTED
        and saved["model"]["architecture"] == module.hparams.model["architecture"]
    )


def test_url_credentials_are_masked_in_configs_and_text():
    """``client.base_url=http://user:sk-...@host/v1``: the key is in no environment variable, so the value rule
    misses it. Bug caught: the URL logged (and dumped) verbatim; or the whole URL masked, hiding the host."""
    from billa.utils.secrets import redact_text

    config = {
        "client": {"base_url": "http://billa:sk-url-0123456789@10.0.0.5:8000/v1", "model": "gpt-4"},
        "mirror": "https://sk-bare-key-0123@proxy.example.org/v1/chat",
        "plain": "http://127.0.0.1:8000/v1",
        "email_like": "see user@example.org, or http://example.org/a@b",
    }
    clean = redact(config, secrets=[])
    assert clean["client"] == {"base_url": "http://***@10.0.0.5:8000/v1", "model": "gpt-4"}
    assert clean["mirror"] == "https://***@proxy.example.org/v1/chat"
    assert clean["plain"] == config["plain"] and clean["email_like"] == config["email_like"]
    message = "cannot reach http://billa:sk-url-0123456789@10.0.0.5:8000/v1 (client.base_url): refused; key sk-env-99"
    assert redact_text(message, secrets=["sk-env-99"]) == (
        "cannot reach http://***@10.0.0.5:8000/v1 (client.base_url): refused; key ***"
    )


def test_hydra_files_are_rewritten_without_secrets(tmp_path):
    """The three files Hydra writes before the job runs. Bugs caught: a key in an override (``base_url`` with
    credentials, ``+x.api_key=...``) or in the composed config left in ``.hydra/*.yaml``; files without a secret
    rewritten (their formatting changed) for nothing."""
    import yaml
    from omegaconf import OmegaConf

    from billa.utils.secrets import redact_hydra_files

    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    url = "http://billa:sk-url-0123456789@10.0.0.5:8000/v1"
    overrides = [f"client.base_url={url}", "+judge.api_key=sk-pasted-0123456789", "input=tasks.jsonl"]
    config = {"input": "tasks.jsonl", "client": {"base_url": url, "model": "gpt-4"}, "judge": {"extra": "${oc.env:X}"}}
    OmegaConf.save(OmegaConf.create(config), hydra_dir / "config.yaml")  # as Hydra writes them
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": overrides}, "job": {"name": "rationale"}}}),
                   hydra_dir / "hydra.yaml")  # fmt: skip
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")
    untouched = tmp_path / "plain" / ".hydra"
    untouched.mkdir(parents=True)
    (untouched / "overrides.yaml").write_text("# kept as is\n- input=tasks.jsonl\n")

    rewritten = redact_hydra_files(hydra_dir, secrets=[])
    assert sorted(p.name for p in rewritten) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    for path in rewritten:
        assert "sk-url-0123456789" not in path.read_text() and "sk-pasted" not in path.read_text()
    masked = ["client.base_url=http://***@10.0.0.5:8000/v1", "+judge.api_key=***", "input=tasks.jsonl"]
    assert yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) == masked
    assert yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["overrides"]["task"] == masked
    saved = OmegaConf.load(hydra_dir / "config.yaml")  # still a config Hydra can read, interpolations kept
    assert (
        saved.client.base_url == "http://***@10.0.0.5:8000/v1"
        and saved.judge._get_node("extra")._value() == "${oc.env:X}"
    )
    assert redact_hydra_files(untouched, secrets=[]) == []
    assert (untouched / "overrides.yaml").read_text() == "# kept as is\n- input=tasks.jsonl\n"
