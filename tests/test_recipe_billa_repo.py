"""data=billa_repo: a directory laid out like BiLLa's training code, read as it is, trains every stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from billa.config import ConfigError
from billa.data.datamodule import DEFAULT_PROMPTS_DIR
from billa.sample.billa_repo import build_billa_repo_sample
from billa.train import run, stage_datamodule

from .conftest import compose_train

STAGES = {"pretrain": ["zh", "en", "translate"], "task_mix": ["zh", "en-squad2"], "sft": ["mwp-zh", "others"]}


@pytest.fixture(scope="module")
def billa_repo(tmp_path_factory, cache_dir) -> Path:
    cfg = compose_train([])
    root = tmp_path_factory.mktemp("billa-repo") / "pretraining_corpora"
    build_billa_repo_sample(root, DEFAULT_PROMPTS_DIR, dict(cfg.data.prompt_types))
    return root


def _cfg(stage: str, root: Path, out: Path, cache: Path, extra=()):
    return compose_train(
        [
            f"stage={stage}",
            "data=billa_repo",
            f"data.root={root}",
            "logger=none",
            "batch.global_size=4",
            "hardware.micro_batch_size=4",
            "trainer.max_steps=2",
            "scheduler.warmup_steps=1",
            "data.max_seq_length=128",
            "validate_at_start=false",
            "trainer.enable_progress_bar=false",
            "data.num_proc=1",  # small files: worker start-up would cost more than it saves
            *extra,
        ],
        output_dir=out,
        cache=cache,
    )


def test_layout_and_stage_slices_follow_billas_file_start(billa_repo, cache_dir, sample_tokenizer_dir):
    """Bug caught: billa_repo's slices treat BiLLa's file numbers as indices (stage 2 then reads nothing, or stage 1's
    files), or the prompt/translate files of the layout are not found."""
    from hydra.utils import instantiate

    assert (billa_repo / "translate" / "en-zh.prompt").is_file() and (billa_repo / "prompts").is_dir()
    assert (billa_repo / "prompts" / "ape210k.pre.prompt").is_file()
    files = {}
    for stage, slice_name in (("pretrain", "stage1"), ("task_mix", "stage2")):
        cfg = _cfg(stage, billa_repo, Path("/nonexistent"), cache_dir)
        assert cfg.data.slice == slice_name
        datamodule = stage_datamodule(cfg, instantiate(cfg.model.tokenizer))
        files[stage] = {name: [Path(f).name for f in datamodule.files(name, "train")] for name in ("zh", "en")}
        assert set(datamodule.prompts) >= {"translation.en2zh", "translation.zh2en", "ape210k.pre", "squad2.post"}
    assert files["pretrain"]["zh"] == [f"{n}.jsonl" for n in range(10001, 10017)]
    assert files["task_mix"]["zh"] == ["10017.jsonl", "10018.jsonl"]
    assert files["task_mix"]["en"] == ["10041.jsonl", "10042.jsonl"]
    cfg = _cfg("task_mix", billa_repo, Path("/nonexistent"), cache_dir, ["data.sources.zh.slices.stage2=20000.jsonl:"])
    datamodule = stage_datamodule(cfg, instantiate(cfg.model.tokenizer))
    with pytest.raises(ConfigError, match=r"data.sources.zh.slices.stage2='20000.jsonl:' selects no file"):
        datamodule.files("zh", "train")


@pytest.mark.parametrize("stage", [pytest.param("pretrain", marks=pytest.mark.slow), "task_mix", "sft"])
def test_every_stage_trains_on_billas_layout(stage, billa_repo, cache_dir, sample_tokenizer_dir, tmp_path):
    """Bug caught: a stage that composes with data=billa_repo but cannot read a source of BiLLa's layout (record
    shape, prompts, file names), found only when a user's run starts."""
    result = run(_cfg(stage, billa_repo, tmp_path, cache_dir, ["export.verify=false"]))
    assert result["global_step"] == 2
    for name in STAGES[stage]:
        assert result["data"][f"{name}/train"]["examples"] > 0, name
    assert (tmp_path / "hf" / "config.json").is_file()
