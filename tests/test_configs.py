"""Every config group choice composes and its object nodes instantiate; batch arithmetic and validation."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from billa.config import ConfigError, plan_batch, plan_hardware, validate
from billa.model.builders import count_parameters
from billa.train import build_strategy

from .conftest import CONF

GROUPS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("stage", "scale", "model", "data", "hardware", "logger", "pipeline")
}


def test_groups_have_the_documented_choices():
    assert GROUPS["stage"] == ["merged_2_3", "pretrain", "sft", "task_mix"]
    assert GROUPS["pipeline"] == ["billa", "merge_2_3", "none", "skip_2", "three_stage"]
    assert GROUPS["scale"] == ["recipe", "sample"]
    assert GROUPS["model"] == ["llama-7b", "tiny"]
    assert GROUPS["data"] == ["billa", "billa_repo", "sample"]
    assert {"cpu", "1xa100", "8xa100"} <= set(GROUPS["hardware"])
    assert GROUPS["logger"] == ["csv", "none", "wandb"]


@pytest.mark.parametrize("stage", GROUPS["stage"])
@pytest.mark.parametrize("hardware", GROUPS["hardware"])
@pytest.mark.parametrize("data", ["billa", "sample"])
def test_every_stage_and_hardware_composes_with_real_data(compose, stage, hardware, data):
    """Catches a stage whose mix names a source the data config lacks, or a batch that cannot divide (e.g. the
    sample's global batch on 8 GPUs), for every (stage, hardware, data) a user can choose."""
    model = "llama-7b" if data == "billa" else "tiny"
    vocab = "model.vocab_size=46943"  # hardware.micro_batch_size=auto plans with it (no tokenizer needed here)
    cfg = compose([f"stage={stage}", f"hardware={hardware}", f"data={data}", f"model={model}", vocab])
    plan = validate(cfg)  # every stage's mix is covered by data=billa, and its batch divides on this hardware
    assert plan.global_size == cfg.batch.global_size
    assert plan.global_size == plan.micro_size * plan.world_size * plan.accumulation
    optimizer = instantiate(cfg.optimizer)
    assert optimizer.func.__name__ == "AdamW" and optimizer.keywords["betas"] == [0.9, 0.95]
    assert instantiate(cfg.scheduler).keywords["min_lr_ratio"] == 0.1
    strategy = build_strategy(cfg.hardware, plan_hardware(cfg, plan))
    if isinstance(cfg.hardware.strategy, str):
        assert strategy == cfg.hardware.strategy
    else:
        assert strategy.config["train_micro_batch_size_per_gpu"] == plan.micro_size


def test_stage_values_are_billas(compose):
    expected = {  # docs/recipe.md: lr, steps, global batch (per-GPU batch x GPUs)
        "pretrain": (3e-5, 100_000, 160, {"zh": 4, "en": 4, "translate": 2}),
        "task_mix": (2e-5, 20_000, 160, None),
        "sft": (2e-5, 20_000, 48, None),
    }
    for stage, (lr, steps, batch, mix) in expected.items():
        cfg = compose([f"stage={stage}", "data=billa"])
        assert (cfg.optimizer.lr, cfg.trainer.max_steps, cfg.batch.global_size) == (lr, steps, batch)
        if mix:
            assert dict(cfg.data.mix) == mix
    task_mix = compose(["stage=task_mix", "data=billa"]).data.mix
    lm = sum(task_mix[s] for s in ("zh", "en", "translate"))
    assert lm == 10 and sum(task_mix.values()) - lm == 10  # BiLLa's 1:1 in a cycle of 20


def test_8xa100_is_zero3_bf16(compose):
    cfg = compose(["stage=sft", "model=llama-7b", "hardware=8xa100"])
    assert cfg.hardware.strategy.config.zero_optimization.stage == 3
    assert cfg.hardware.strategy.config.bf16.enabled is True
    assert cfg.hardware.precision == "bf16-mixed"
    assert cfg.hardware.devices == 8


@pytest.mark.parametrize("model", GROUPS["model"])
def test_model_architectures_build_on_meta(compose, model):
    cfg = compose([f"model={model}"])
    vocab = 46_943  # BiLLa's expanded vocabulary
    n = count_parameters(cfg.model.architecture, vocab)
    a = cfg.model.architecture
    per_layer = 4 * a.hidden_size**2 + 3 * a.hidden_size * a.intermediate_size + 2 * a.hidden_size
    assert n == a.num_hidden_layers * per_layer + 2 * vocab * a.hidden_size + a.hidden_size
    if model == "llama-7b":
        assert n == 6_860_828_672
        assert count_parameters(cfg.model.architecture, 32_000) == 6_738_415_616  # LLaMA-7B's published count
    else:
        assert n < 20_000_000


@pytest.mark.parametrize("logger", GROUPS["logger"])
def test_loggers_instantiate(compose, tmp_path, logger, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose([f"logger={logger}"], output_dir=tmp_path)
    if logger == "none":
        assert not cfg.logger
        return
    obj = instantiate(cfg.logger)
    assert obj.save_dir == str(tmp_path)


def test_wandb_mode_environment_wins_over_config_and_login(monkeypatch, tmp_path):
    """README: online when W&B is configured, offline otherwise, and ``WANDB_MODE`` wins over both."""
    from billa.utils.loggers import wandb_logger

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # restored after the test
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)

    def mode(config_mode=None) -> str:
        return wandb_logger("billa", "test", str(tmp_path), mode=config_mode)._wandb_init["mode"]

    assert mode() == "offline"  # not configured
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert mode() == "online"  # configured
    assert mode("offline") == "offline"  # logger.mode wins over the login
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert mode() == "disabled" and mode("online") == "disabled"  # the environment wins over both


def test_tiny_model_tokenizer_and_sample_data_instantiate(compose, cache_dir, sample_tokenizer_dir):
    cfg = compose([], cache=cache_dir)
    assert instantiate(cfg.model.tokenizer) == sample_tokenizer_dir
    counts = instantiate(cfg.data.build)()  # a partial: the DataModule calls it in prepare_data
    assert counts["wudao/train"] > 400 and counts["translation/train"] > 4000


def test_a_mix_source_missing_from_the_data_config_is_named(compose):
    cfg = compose(["stage=task_mix", "~data.sources.zh-qa-long"])
    with pytest.raises(ConfigError, match=r"data.mix.*zh-qa-long.*data.sources"):
        validate(cfg)


def test_bad_batch_combination_names_the_keys(compose):
    cfg = compose(["hardware=8xa100", "hardware.micro_batch_size=2", "batch.global_size=100", "data=billa"])
    with pytest.raises(ConfigError) as err:
        plan_batch(cfg)
    message = str(err.value)
    for key in ("batch.global_size=100", "hardware.micro_batch_size=2", "hardware.devices=8"):
        assert key in message
    assert "[1, 2, 3, 4, 5, 6, 10, 12, 25]" not in message  # only values that divide with 8 devices are offered
    assert "may be one of [1]" not in message


def test_batch_accumulation_is_derived(compose):
    cfg = compose(["stage=pretrain", "hardware=8xa100", "hardware.micro_batch_size=2", "data=billa"])
    plan = plan_batch(cfg)
    assert (plan.micro_size, plan.world_size, plan.accumulation) == (2, 8, 10)  # 160 = 2 x 8 x 10
    cfg = compose(["stage=sft", "hardware=8xa100", "hardware.micro_batch_size=2", "data=billa"])
    assert plan_batch(cfg).accumulation == 3  # 48 = 2 x 8 x 3


@pytest.mark.parametrize("key,value", [("hardware.micro_batch_size", 0), ("batch.global_size", "many")])
def test_non_positive_values_are_rejected(compose, key, value):
    cfg = compose([])
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan_batch(cfg)


@pytest.mark.parametrize("op", sorted(p.stem for p in (CONF / "op").glob("*.yaml")))
def test_convert_ops_compose(op):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("convert", overrides=[f"op={op}", "++op.out_dir=/tmp/x", "+op.unused=1"])
    assert cfg.op._target_.startswith("billa.")
    target = instantiate({"_target_": "hydra.utils.get_method", "path": cfg.op._target_})
    assert callable(target)
