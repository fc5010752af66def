"""The three-stage pipeline on the tiny default: chaining, reuse, resume of config changes, the ablation sweep,
the mask inspector and the chat command. Schedules are cut to a few steps; the code path is the real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from billa.pipeline import run_pipeline

from .conftest import QUICK_PIPELINE, ROOT, compose_train

QUICK = QUICK_PIPELINE  # every stage: a few steps, small validation, CSV metrics


def _weights(export_dir: str) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(Path(export_dir).glob("*.safetensors")):
        state.update(load_file(path))
    return state


def _pipeline(store: Path, out: Path, cache: Path, *extra: str, step_overrides: dict | None = None) -> dict:
    cfg = compose_train(["pipeline=billa", *QUICK, f"pipeline.store_dir={store}", *extra], output_dir=out, cache=cache)
    with open_dict(cfg):
        for index, overrides in (step_overrides or {}).items():
            cfg.pipeline.steps[index].overrides = overrides
    return run_pipeline(cfg, overrides=[*QUICK, *extra])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def first(store, tmp_path_factory, cache_dir, sample_tokenizer_dir):
    """vocab -> stage 1 -> stage 2 (lr 0: its export must equal its start weights) -> stage 3."""
    out = tmp_path_factory.mktemp("pipeline-1")
    return out, _pipeline(store, out, cache_dir, step_overrides={1: ["optimizer.lr=0.0"]})


def test_pipeline_chains_every_stage_from_the_previous_export(first):
    """Catches a stage that starts from random init or from the wrong stage instead of the previous export."""
    out, result = first
    vocab, stage1, stage2, stage3 = result["steps"]
    assert vocab["step"] == "vocab" and vocab["report"]["pieces_added"] > 1000  # the expansion ran (tiny default)
    assert [s["stage"] for s in (stage1, stage2, stage3)] == ["pretrain", "task_mix", "sft"]
    assert not any(s["reused"] for s in (stage1, stage2, stage3))
    assert stage2["init_from"] == stage1["export_dir"] and stage3["init_from"] == stage2["export_dir"]
    w1, w2, w3 = (_weights(s["export_dir"]) for s in (stage1, stage2, stage3))
    assert set(w1) == set(w2) == set(w3)
    for name in w1:  # stage 2 ran at lr 0: it exports exactly the weights it started from, stage 1's, bit for bit
        assert torch.equal(w1[name], w2[name]), name
    assert any(not torch.equal(w2[n], w3[n]) for n in w2)  # stage 3 trained from there
    assert all(s["global_step"] == 3 for s in (stage1, stage2, stage3))
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["final_export"] == stage3["export_dir"]
    kinds = summary["validation"]["by_kind"]
    assert set(kinds) == {"text", "translation", "task", "instruction"} and all(v > 0 for v in kinds.values())


def test_finished_stages_are_reused_and_a_config_change_retrains_downstream(first, store, tmp_path, cache_dir):
    """Catches retraining a finished stage (sweeps would pay stage 1 again) and reusing one after a change."""
    _, result = first
    again = _pipeline(store, tmp_path / "again", cache_dir, step_overrides={1: ["optimizer.lr=0.0"]})
    assert [s["reused"] for s in again["steps"][1:]] == [True, True, True]
    assert again["trained_steps"] == 0
    assert [s["dir"] for s in again["steps"][1:]] == [s["dir"] for s in result["steps"][1:]]
    changed = _pipeline(
        store, tmp_path / "changed", cache_dir, step_overrides={1: ["optimizer.lr=0.0"], 2: ["optimizer.lr=1e-3"]}
    )
    assert [s["reused"] for s in changed["steps"][1:]] == [True, True, False]
    assert changed["steps"][3]["dir"] != result["steps"][3]["dir"]


@pytest.mark.slow
def test_an_upstream_change_retrains_every_later_stage(first, store, tmp_path, cache_dir):
    """Catches a stage reused although the stage it starts from was retrained (its key must chain the parent's)."""
    upstream = _pipeline(store, tmp_path / "upstream", cache_dir, step_overrides={1: ["optimizer.lr=1e-4"]})
    assert [s["reused"] for s in upstream["steps"][1:]] == [True, False, False]  # a new stage 2 -> a new stage 3


@pytest.mark.slow
def test_half_finished_stage_resumes_and_is_not_marked_done(store, tmp_path, cache_dir, sample_tokenizer_dir):
    """Catches a stopped stage marked finished (later stages would start from half-trained weights) and a rerun that
    restarts it from scratch instead of its last checkpoint."""
    extra = ["trainer.max_steps=4", "checkpoint.every_n_steps=2"]
    stopped = _pipeline(store, tmp_path / "stopped", cache_dir, *extra, "stop_after_steps=2")
    assert stopped["status"] == "stopped" and len(stopped["steps"]) == 2  # vocab + the stopped stage 1, no stage 2
    stage1 = stopped["steps"][1]
    assert stage1["global_step"] == 2 and not Path(stage1["dir"], "DONE.json").exists()
    resumed = _pipeline(store, tmp_path / "resumed", cache_dir, *extra)
    assert resumed["status"] == "done"
    assert resumed["steps"][1]["dir"] == stage1["dir"] and resumed["steps"][1]["global_step"] == 4
    assert resumed["steps"][1]["resumed"] and Path(stage1["dir"], "DONE.json").is_file()
    versions = sorted(Path(stage1["dir"], "csv").glob("version_*"))
    assert len(versions) == 2  # one stage directory, two runs: the second continued at step 3
    second = (versions[1] / "metrics.csv").read_text().splitlines()
    header = second[0].split(",")
    logged = {int(line.split(",")[header.index("step")]) for line in second[1:]}
    assert logged and min(logged) >= 2  # nothing of steps 1-2 was trained again


def _sweep(tmp_path, cache_dir, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py -m <overrides>`` with its stage store and sweep directory under ``tmp_path``."""
    return subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            *overrides,
            f"pipeline.store_dir={tmp_path / 'stages'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],  # fmt: skip
        cwd=ROOT,
        env={**os.environ, "BILLA_CACHE_DIR": str(cache_dir)},
        capture_output=True,
        text=True,
        timeout=1800,
    )


@pytest.mark.slow
def test_ablation_sweep_writes_its_comparison(store, tmp_path, cache_dir, sample_tokenizer_dir):
    """The multirun a user runs for the stage-merging ablation: three variants, one table, stage 1 trained once."""
    result = _sweep(
        tmp_path,
        cache_dir,
        "pipeline=three_stage,merge_2_3,skip_2",
        *[o for o in QUICK if not o.startswith("pipeline.evaluate_tasks")],
        "pipeline.evaluate_tasks=[c3]",  # evaluate.py on the final exports: C3 on the shipped fixtures
    )
    assert result.returncode == 0, result.stderr[-4000:]
    comparison = json.loads((tmp_path / "sweep" / "comparison.json").read_text())
    variants = {v["pipeline"]: v for v in comparison["variants"]}
    assert list(variants) == ["three_stage", "merge_2_3", "skip_2"]
    assert variants["three_stage"]["stages"] == ["pretrain", "task_mix", "sft"]
    assert variants["merge_2_3"]["stages"] == ["pretrain", "merged_2_3"]
    assert variants["skip_2"]["stages"] == ["pretrain", "sft"]
    assert variants["three_stage"]["reused"] == [] and "stage1" in variants["merge_2_3"]["reused"]
    assert "stage1" in variants["skip_2"]["reused"]  # stage 1 trained once for the whole sweep
    assert set(comparison["kinds"]) == {"text", "translation", "task", "instruction"}
    table = (tmp_path / "sweep" / "comparison.md").read_text()
    assert "| three_stage | pretrain -> task_mix -> sft |" in table and "| skip_2 |" in table
    assert "c3/d/loglik/acc" in table  # evaluate.py's headline metrics per variant
    assert all(0.0 <= v["evaluation"]["c3"]["d/loglik/acc"] <= 1.0 for v in comparison["variants"])
    assert (tmp_path / "sweep" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = {json.loads((tmp_path / "sweep" / p / "pipeline.json").read_text())["group"] for p in ("0", "1", "2")}
    assert groups == {"sweep-sweep"}  # every variant's stages in one W&B group (named after the sweep directory)
    stage_dirs = sorted(p.name.split("-")[0] for p in (tmp_path / "stages").iterdir() if p.is_dir())
    assert stage_dirs.count("stage1") == 1 and stage_dirs.count("stage3") == 2  # after stage 2, and after stage 1


def test_mask_inspector_marks_exactly_the_loss_tokens(cache_dir, sample_tokenizer_dir):
    """Catches an inspector that marks prompts as trained (or the reverse), which would mislead every user."""
    from io import StringIO

    from rich.console import Console

    from billa.inspect_masks import CLOSE, OPEN, inspect_stage

    cfg = compose_train(["stage=sft", "inspect=6", "data.val_max_records=4"], cache=cache_dir)
    buffer = StringIO()
    result = inspect_stage(cfg, console=Console(file=buffer, width=200, color_system=None))
    text = buffer.getvalue()
    assert len(result["samples"]) == 6 and text.count("--- sample") == 6
    for sample in result["samples"]:
        marked = [chunk for chunk, loss in sample["segments"] if loss]
        unmarked = "".join(chunk for chunk, loss in sample["segments"] if not loss)
        assert unmarked.startswith("<s> Human: ") or unmarked.startswith("<s>Human: ")
        assert "Assistant:" in unmarked and all(chunk.endswith("</s>") for chunk in marked)
        assert not any("Human:" in chunk for chunk in marked)
        assert text.count(OPEN) == text.count(CLOSE)


def test_chat_prompts_are_the_sft_objective_prefixes(first, tmp_path):
    """Catches a chat command that prompts differently from what SFT trained (no BOS, no trailing-space token, other
    turn joining), single and multi-turn, and a chat.py whose answers differ from the template's."""
    from transformers import AutoTokenizer

    from billa.chat import Chat, prompt_ids
    from billa.data.objectives import IGNORE, ObjectiveContext, dialogue, record_rng

    _, result = first
    export = result["final_export"]
    tokenizer = AutoTokenizer.from_pretrained(export)
    ctx = ObjectiveContext(
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        max_len=512,
    )
    turns = [{"human": "你好", "assistant": "你好！"}, {"human": "What is 3 + 4?", "assistant": "7"}]
    example = dialogue({"turns": turns}, ctx, record_rng(0, "chat", 0))
    last_answer_start = max(i for i, label in enumerate(example.labels) if label == IGNORE) + 1
    assert prompt_ids(tokenizer, "What is 3 + 4?", [("你好", "你好！")]) == example.input_ids[:last_answer_start]
    single = dialogue({"turns": turns[:1]}, ctx, record_rng(0, "chat", 0))
    first_answer_start = single.labels.index(next(label for label in single.labels if label != IGNORE))
    assert prompt_ids(tokenizer, "你好") == single.input_ids[:first_answer_start]
    assert tokenizer.convert_ids_to_tokens(prompt_ids(tokenizer, "你好")[-1]) == "▁"  # "Assistant: " ends in a space
    run = subprocess.run(
        [sys.executable, "chat.py", f"model_path={export}", 'questions=["What is 3 + 4?"]',
         "generation.max_new_tokens=4",
         f"output={tmp_path / 'answers.jsonl'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Human: What is 3 + 4?" in run.stdout and "Assistant:" in run.stdout
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    expected = Chat(export, max_new_tokens=4, do_sample=False).answer("What is 3 + 4?")  # greedy: deterministic
    assert rows == [{"question": "What is 3 + 4?", "answer": expected}]


@pytest.mark.slow
def test_seed_sweep_trains_stage_1_once_per_seed_and_reports_mean_and_std(tmp_path, cache_dir, sample_tokenizer_dir):
    """The ablation a reader can trust: 2 variants x 2 seeds. Catches: a stage key without the seed (seed 2 reusing
    seed 1's stage 1), variants of one seed not sharing their stage 1, or seeds listed as separate variants."""
    result = _sweep(tmp_path, cache_dir, "pipeline=three_stage,merge_2_3", "seed=1,2", *QUICK)
    assert result.returncode == 0, result.stderr[-4000:]
    stage_dirs = sorted(p.name.split("-")[0] for p in (tmp_path / "stages").iterdir() if p.is_dir())
    assert stage_dirs.count("stage1") == 2  # once per seed, not once per sweep point (4) or once in all (1)
    comparison = json.loads((tmp_path / "sweep" / "comparison.json").read_text())
    runs = {(v["pipeline"], v["seed"]): v for v in comparison["variants"]}
    assert set(runs) == {("three_stage", 1), ("three_stage", 2), ("merge_2_3", 1), ("merge_2_3", 2)}
    assert runs["three_stage", 1]["reused"] == runs["three_stage", 2]["reused"] == []  # Hydra runs three_stage first
    assert runs["merge_2_3", 1]["reused"] == runs["merge_2_3", 2]["reused"] == ["stage1"]  # its seed's stage 1
    assert list(comparison["summary"]) == ["three_stage", "merge_2_3"]  # seeds folded into their variant
    for column, stats in comparison["summary"]["merge_2_3"].items():
        assert stats["n"] == 2 and stats["std"] >= 0 and isinstance(stats["within_seed_spread"], bool), column
    assert comparison["seed_spread"]["validation/all"] > 0  # two seeds train differently
    table = (tmp_path / "sweep" / "comparison.md").read_text()
    assert "| three_stage | pretrain -> task_mix -> sft | 1, 2 |" in table and " ± " in table
    assert "not told apart by these seeds" in table  # the legend of the ~ mark
