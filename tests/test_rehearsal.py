"""The 7B configuration rehearsed on CPU (``+experiment=rehearsal``) on the rehearsal corpus in BiLLa's layouts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from billa.config import ConfigError, plan_batch, validate
from billa.data.readers import expand_paths
from billa.sample.rehearsal import build_rehearsal_corpus
from billa.train import embedding_rows

from .conftest import compose_train
from .helpers import ROOT, run_door

STAGES = ["pretrain", "task_mix", "sft"]
GLOBAL = {"pretrain": 160, "task_mix": 160, "sft": 48}  # BiLLa's batches, kept


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, cache_dir, sample_tokenizer_dir) -> Path:
    return _built(tmp_path_factory.mktemp("rehearsal"), cache_dir)


def _built(out: Path, cache_dir: Path) -> Path:
    build_rehearsal_corpus(out, cache_dir / "sample")  # the session's sample corpus and tokenizer, reused
    return out


@pytest.mark.parametrize("data", ["billa", "billa_repo"])
@pytest.mark.parametrize("stage", STAGES)
def test_rehearsal_keeps_the_7b_batch_vocabulary_and_sequence(stage, data):
    """Bug caught: a rehearsal that silently changes what it should keep: the global batch (accumulation not raised
    for 2 ranks, so 2 x 2 x 10 = 40 sequences), the 46,943-row vocabulary or the 1,024-token sequence, or a
    composition where the command line's data=billa_repo or the 8xa100 ZeRO-3 block is lost."""
    cfg = compose_train(
        [f"stage={stage}", "model=llama-7b", f"data={data}", "hardware=8xa100", "+experiment=rehearsal"]
    )
    plan = validate(cfg)
    assert plan.global_size == GLOBAL[stage] == cfg.batch.global_size
    assert (plan.micro_size, plan.devices, plan.num_nodes) == (2, 2, 1)  # 8xa100's micro batch on 2 ranks
    assert plan.accumulation == {"pretrain": 40, "task_mix": 40, "sft": 12}[stage]  # 8xa100: 10, 10, 3
    assert plan.global_size == plan.micro_size * plan.devices * plan.accumulation
    assert cfg.model.vocab_size == 46_943 and cfg.data.max_seq_length == 1024
    assert cfg.model.architecture.max_position_embeddings == 2048
    assert cfg.model.architecture.hidden_size // cfg.model.architecture.num_attention_heads == 128  # head dim kept
    assert cfg.hardware.strategy.config.zero_optimization.stage == 3
    assert cfg.hardware.strategy.config.bf16.enabled is False and cfg.hardware.precision == "32-true"
    assert cfg.hardware.activation_checkpointing is True
    assert cfg.hardware.strategy._target_.endswith("CPUDeepSpeedStrategy")
    assert cfg.optimizer.lr == compose_train([f"stage={stage}", f"data={data}"]).optimizer.lr  # the stage's lr
    assert cfg.trainer.max_steps == 2 and cfg.scheduler.warmup_steps < cfg.trainer.max_steps
    assert cfg.model.pretrained_path is None and cfg.model.tokenizer.path.endswith("/../tokenizer")
    assert plan_batch(cfg) == plan


def test_vocab_size_pads_the_embedding_but_never_truncates_it(compose):
    """Bug caught: ``model.vocab_size`` smaller than the tokenizer accepted (token ids past the embedding fail only
    at the first batch holding one), or null not meaning the tokenizer's size."""
    assert embedding_rows(compose([]).model, 3486) == 3486
    padded = compose(["+experiment=rehearsal"]).model
    assert embedding_rows(padded, 3486) == 46_943
    with pytest.raises(ConfigError, match=r"model.vocab_size.*at least the tokenizer's 50,000"):
        embedding_rows(padded, 50_000)


def test_corpus_has_billas_layouts_and_file_names(corpus):
    """Bug caught: a rehearsal corpus whose names differ from the real corpora's (PILE's NN.jsonl.zst, WuDao's part
    files, BiLLa's numbered files with the stage-2 starts), so the rehearsal passes where the real run fails."""
    repo, billa = corpus / "billa_repo", corpus / "billa"
    for source, stage2_start, count in (("zh", 10017, 18), ("en", 10041, 42), ("translate", 10009, 10)):
        names = sorted(p.name for p in (repo / source).glob("*.jsonl"))
        assert names[0] == "10001.jsonl" and f"{stage2_start}.jsonl" in names and len(names) == count
    assert (repo / "translate" / "en-zh.prompt").is_file() and (repo / "prompts" / "ape210k.pre.prompt").is_file()
    assert sorted(p.name for p in (billa / "pile" / "train").iterdir()) == [f"{n:02d}.jsonl.zst" for n in range(30)]
    assert (billa / "pile" / "val.jsonl.zst").is_file() and (corpus / "tokenizer" / "tokenizer.model").is_file()
    assert all(p.name.startswith("part-2021") for p in (billa / "wudao").iterdir())
    assert (billa / "sft" / "code-alpaca-en.json").is_file() and list((billa / "sft" / "others").iterdir())


def test_data_billa_reads_piles_zst_shards_and_jsonl(corpus, tmp_path):
    """Bug caught: data=billa's PILE glob ``*.jsonl`` skips ``.jsonl.zst``, the form PILE is distributed in, so
    stage 1 stops with "no file matches" (or, with some .jsonl beside them, trains on a fraction of PILE)."""
    from hydra.utils import instantiate

    from billa.train import stage_datamodule

    cfg = compose_train(
        [
            "data=billa",
            "model=llama-7b",
            "+experiment=rehearsal",
            f"data.root={corpus / 'billa'}",
            "trainer.max_steps=4",
        ]
    )  # 4 x 160 samples: en's stream reads all 30 shards
    datamodule = stage_datamodule(cfg, instantiate(cfg.model.tokenizer))
    files = [Path(f).name for f in datamodule.files("en", "train")]
    assert files == [f"{n:02d}.jsonl.zst" for n in range(30)]
    assert [Path(f).name for f in datamodule.files("en", "val")] == ["val.jsonl.zst"]
    (tmp_path / "30.jsonl").write_text("{}\n")  # decompressed shards beside compressed ones: both read
    both = expand_paths([str(tmp_path / "*.jsonl"), f"{corpus}/billa/pile/train/*.jsonl.zst"], "en")
    assert len(both) == 31 and sum(f.endswith("/30.jsonl") for f in both) == 1
    with pytest.raises(FileNotFoundError, match="no file matches any of"):
        expand_paths([str(tmp_path / "*.zst"), str(tmp_path / "*.parquet")], "data.sources.en.train")
    datamodule.prepare_stage()  # tokenise what the stage reads
    stats = datamodule.stats["en/train"]
    assert (stats["records"], stats["filtered"]) == (210, 30)  # 30 shards x 8: "Wikipedia (en)" is not kept


# ---- slow: every stage through `python train.py ... +experiment=rehearsal` on 2 ZeRO-3 CPU ranks ---------------


def _train(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    return [
        "train.py",
        "model=llama-7b",
        "hardware=8xa100",
        "+experiment=rehearsal",
        "logger=csv",
        "progress=text",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


def _env(cache_dir: Path) -> dict:
    return {"BILLA_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore"}


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _export_check(run_dir: Path) -> float:
    check = json.loads((run_dir / "export_check.json").read_text())
    assert check["export_max_abs_logit_diff"] <= 1e-5, check  # the export is the live model
    config = json.loads((run_dir / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 46_943 and config["hidden_size"] == 128
    return check["export_max_abs_logit_diff"]


def _losses(run_dir: Path) -> dict[int, float]:
    from .conftest import logged

    return logged(run_dir, "train/loss")


def _kill_after_first_checkpoint(args: list[str], env: dict, run_dir: Path, timeout: float = 400) -> None:
    """Start ``python train.py`` in its own process group; SIGKILL every rank once step 1's checkpoint is complete."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the rank it spawns joins the group: the kill takes the whole job, as a node loss
    )
    marker = run_dir / "checkpoints" / "step=000001.ckpt" / "COMPLETE"
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            assert proc.poll() is None, f"train.py exited ({proc.returncode}) before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "hf").exists()  # killed before step 2: nothing exported


@pytest.mark.slow
def test_rehearsal_billa_repo_every_stage_with_kill_and_resume(corpus, cache_dir, tmp_path):
    """Bug caught: the 7B configuration failing where only the real job would find it (ZeRO-3 over 46,943 rows with
    160-sequence accumulation, the stage chain through exports, resume of a killed ZeRO-3 job), or an export that
    is not the trained model. Stage 1 is killed with SIGKILL after its first checkpoint and rerun with
    ``resume=auto``: it continues from step 1 (the loss of step 1 is not logged again) to step 2."""
    env, root = _env(cache_dir), f"data.root={corpus / 'billa_repo'}"
    pretrain = tmp_path / "pretrain"
    args = _train(pretrain, cache_dir, "stage=pretrain", "data=billa_repo", root)
    _kill_after_first_checkpoint(args, env, pretrain)
    resumed = run_door(*args, "resume=auto", env=env, timeout=600)
    _check(resumed)
    assert "Resuming from" in resumed.stdout + resumed.stderr and "step=000001.ckpt" in resumed.stdout + resumed.stderr
    import csv

    last_version = sorted((pretrain / "csv").rglob("metrics.csv"))[-1]  # the resumed run's own CSV version
    steps = [int(row["step"]) for row in csv.DictReader(last_version.open()) if row.get("train/loss")]
    assert steps == [1]  # only step 2 (CSV step 1) trained after the resume: step 1 came from the checkpoint
    _export_check(pretrain)
    previous = pretrain
    for stage in ("task_mix", "sft"):
        run_dir = tmp_path / stage
        result = run_door(
            *_train(run_dir, cache_dir, f"stage={stage}", "data=billa_repo", root, f"init_from={previous / 'hf'}"),
            env=env,
            timeout=600,
        )
        _check(result)
        assert set(_losses(run_dir)) == {0, 1}, stage  # 2 optimizer steps of the stage's global batch
        _export_check(run_dir)
        previous = run_dir


@pytest.mark.slow
def test_rehearsal_data_billa_stage_two_continues_stage_one_after_a_kill(corpus, cache_dir, tmp_path):
    """Stage 1 on data=billa (PILE's .jsonl.zst shards, WuDao's part files) under the 7B configuration on 2 ranks,
    killed with SIGKILL after its first checkpoint and resumed; stage 2 from its export; stage 3 from stage 2's.

    Bug caught: data=billa not reading the corpora's distributed forms, a data state that counts only the samples
    since the resume (or one rank's share), stage 2 replaying stage 1's text or skipping records (it must start at
    the record right after stage 1's last, in file order), or an export that differs from the model."""
    from billa.data.readers import read_records

    env, root = _env(cache_dir), f"data.root={corpus / 'billa'}"
    pretrain, task_mix, sft = tmp_path / "pretrain", tmp_path / "task_mix", tmp_path / "sft"
    args = _train(pretrain, cache_dir, "stage=pretrain", "data=billa", root)
    _kill_after_first_checkpoint(args, env, pretrain)
    _check(run_door(*args, "resume=auto", env=env, timeout=600))
    _export_check(pretrain)
    state1 = json.loads((pretrain / "hf" / "billa_data_state.json").read_text())
    assert state1["samples"] == 2 * 160  # both steps, the one before the kill included
    assert {n: s["records_read"] for n, s in state1["sources"].items()} == {"zh": 128, "en": 128, "translate": 64}
    one_step = ("trainer.max_steps=1", "scheduler.warmup_steps=0")
    _check(
        run_door(
            *_train(
                task_mix, cache_dir, "stage=task_mix", "data=billa", root, f"init_from={pretrain / 'hf'}", *one_step
            ),
            env=env,
            timeout=600,
        )
    )
    _export_check(task_mix)
    state2 = json.loads((task_mix / "hf" / "billa_data_state.json").read_text())
    cfg = compose_train(["data=billa", f"data.root={corpus / 'billa'}"])
    for name, read in {"zh": 32, "en": 32, "translate": 16}.items():  # stage 2's 160 samples: 4:4:2 of half
        spec = cfg.data.sources[name]
        options = {"pile_sets": list(spec.pile_sets)} if "pile_sets" in spec else {}
        order = [
            (Path(f).name, r.line)
            for f in expand_paths(list(spec.train) if not isinstance(spec.train, str) else spec.train, name)
            for r in read_records(f, spec.format, name, **options)
        ]
        first = order.index((state1["sources"][name]["file"], state1["sources"][name]["after_line"])) + 1
        assert state2["sources"][name]["records_read"] == read
        assert (state2["sources"][name]["file"], state2["sources"][name]["after_line"]) == order[first + read - 1]
    _check(
        run_door(
            *_train(sft, cache_dir, "stage=sft", "data=billa", root, f"init_from={task_mix / 'hf'}", *one_step),
            env=env,
            timeout=600,
        )
    )
    assert set(_losses(sft)) == {0}
    _export_check(sft)
