"""evaluate.py end to end: Hydra composition of conf/evaluate.yaml, run(cfg), files, logger, report, judge, CLI."""

from __future__ import annotations

import json
import os
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from billa.evaluate import run

from .conftest import CONF, ROOT
from .evaluate_helpers import make_export
from .helpers import run_door
from .openai_server import OpenAIServer

FAST = [  # the default tasks, with 4 generated tokens instead of 64
    "task.logiqa2.generative_settings.max_new_tokens=4",
    "task.c3.generative_settings.max_new_tokens=4",
]


def compose_evaluate(overrides: list[str], output_dir, cache_dir):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir, cfg.cache_dir = str(output_dir), str(cache_dir)
    return cfg


@pytest.fixture(scope="module")
def exports(tmp_path_factory, sample_tokenizer_dir):
    root = tmp_path_factory.mktemp("runs")
    return root, [
        make_export(sample_tokenizer_dir, root / "outputs" / "pretrain" / d / "hf", seed=s)
        for d, s in (("2026-01-01_00-00-00", 0), ("2026-01-02_00-00-00", 1))
    ]


@pytest.mark.parametrize("task", sorted(p.stem for p in (CONF / "task").glob("*.yaml")))
def test_every_task_config_composes_and_names_a_callable(task, tmp_path):
    cfg = compose_evaluate([f"task={task}", "model=llama-7b", "hardware=8xa100"], tmp_path, tmp_path)
    from hydra.utils import get_method

    node = cfg.task[task]
    assert node._partial_ is True and callable(get_method(node._target_))
    assert cfg.hardware.precision == "bf16-mixed" and cfg.hardware.devices == 8


def test_default_tasks_write_json_markdown_and_log_wandb_tables(exports, cache_dir, tmp_path, monkeypatch):
    """Catches: a task's files or logger output missing, results.json not listing every task's metrics."""
    root, (first, second) = exports
    os.utime(first / "config.json", (time.time() + 5, time.time() + 5))  # the newest export is taken
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "ev"
    cfg = compose_evaluate(
        [*FAST, f"exports_glob={root}/outputs/*/*/hf", "logger=wandb", "label=first"], out, cache_dir
    )
    result = run(cfg)
    assert result["model_path"] == str(first)
    for task in ("ppl", "logiqa2", "c3"):
        data = json.loads((out / f"{task}.json").read_text())
        assert data["metrics"] and data["tables"]
        assert (out / f"{task}.md").read_text().startswith(f"# {task}")
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert {"zh/conditional_generation/bits_per_char", "en/causal_lm/ppl"} <= metrics["ppl"].keys()
    assert {"zh/generative/acc", "en/loglik/acc_norm"} <= metrics["logiqa2"].keys()
    assert {"d/loglik/acc", "m/generative/unparsed"} <= metrics["c3"].keys()
    tables = {p.parent.name for p in (out / "wandb").rglob("*.table.json")}  # files/media/table/<task>/<name>_*
    assert {"ppl", "logiqa2", "c3"} <= tables
    items = json.loads(next((out / "wandb").rglob("c3/items_*.table.json")).read_text())  # per-item predictions
    assert len(items["data"]) == sum(metrics["c3"][f"{subset}/items"] for subset in ("d", "m"))
    assert {"id", "answer", "generative_pred", "loglik_pred"} <= set(items["columns"])


def test_report_compares_two_runs_in_a_png(exports, cache_dir, tmp_path):
    root, (first, second) = exports
    runs = []
    for label, export in (("step-a", first), ("step-b", second)):
        out = tmp_path / label
        run(
            compose_evaluate(
                [
                    "task=[ppl,c3]",
                    "task.c3.protocols=[loglik]",
                    f"model_path={export}",
                    f"label={label}",
                    "logger=none",
                ],
                out,
                cache_dir,
            )
        )
        runs.append(str(out))
    out = tmp_path / "report"
    run(compose_evaluate(["task=report", f"task.report.runs=[{runs[0]},{runs[1]}]", "logger=none"], out, cache_dir))
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = json.loads((out / "report.json").read_text())["tables"]["comparison"]
    assert table["columns"] == ["metric", "step-a", "step-b"]
    keys = [row[0] for row in table["rows"]]
    assert "ppl/zh/conditional_generation/bits_per_char" in keys and "c3/d/loglik/acc_norm" in keys
    a, b = (
        json.loads((tmp_path / label / "results.json").read_text())["metrics"]["c3"]["d/loglik/acc_norm"]
        for label in ("step-a", "step-b")
    )
    assert table["rows"][keys.index("c3/d/loglik/acc_norm")][1:] == [a, b]


def test_answers_then_judge_through_the_config(exports, cache_dir, tmp_path, monkeypatch):
    """Answers of two models, then the judge via conf/task/judge.yaml against the local server; no key in outputs."""
    from .test_judge import scripted_judge

    root, (first, second) = exports
    key = "sk-e2e-0123456789abcdef"
    monkeypatch.setenv("BILLA_E2E_KEY", key)
    short = ["task.answers.max_new_tokens=6", "logger=none"]
    run(compose_evaluate(["task=answers", f"model_path={first}", "model_id=A", *short], tmp_path / "a", cache_dir))

    def responder(messages, body):  # score whatever the two answers are: 7 for Assistant 1, 5 for Assistant 2
        return "(7, 5)" if "math question above" in messages[-1]["content"] else "7 5\nok"

    with OpenAIServer(respond=responder) as server:
        overrides = [
            "task=[answers,judge]",
            f"model_path={second}",
            "model_id=B",
            *short,
            f"task.judge.answer_files=[{tmp_path}/a/answers.jsonl,{tmp_path}/b/answers.jsonl]",
            f"task.judge.client.base_url={server.url}",
            "task.judge.client.api_key_env=BILLA_E2E_KEY",
            f"task.judge.client.cache_path={tmp_path}/judge-cache.jsonl",
            "task.judge.client.backoff_s=0.01",
        ]
        result = run(compose_evaluate(overrides, tmp_path / "b", cache_dir))
        assert len(server.chat_requests()) == 16  # 8 questions x 2 orders
    assert result["metrics"]["judge"]["micro/a/mean"] == pytest.approx(6.0)  # 7 in order ab, 5 in order ba
    assert result["metrics"]["judge"]["position_bias"] == pytest.approx(2.0)
    answers_b = [json.loads(line) for line in (tmp_path / "b" / "answers.jsonl").read_text().splitlines()]
    assert [a["model_id"] for a in answers_b] == ["B"] * 8
    assert "| micro |" in (tmp_path / "b" / "judge.md").read_text()
    for path in (tmp_path / "b").rglob("*"):
        if path.is_file():
            assert key not in path.read_text(errors="ignore"), path
    del scripted_judge


def test_cli_without_an_export_names_model_path(tmp_path):
    result = run_door(str(ROOT / "evaluate.py"), "logger=none", "task=ppl", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
    assert result.returncode != 0
    assert "model_path is not set and no export matches 'outputs/*/*/hf'" in result.stderr


@pytest.mark.slow
def test_python_evaluate_py_with_no_overrides(exports, cache_dir, tmp_path):
    """The README's command in a directory where `python train.py` exported a model: done in about a minute."""
    _, (first, _) = exports
    target = tmp_path / "outputs" / "pretrain" / "2026-02-02_00-00-00"
    target.mkdir(parents=True)
    os.symlink(first, target / "hf")
    env = {"BILLA_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline"}
    start = time.time()
    result = run_door(str(ROOT / "evaluate.py"), cwd=tmp_path, env=env, timeout=600)
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| zh | conditional_generation |" in result.stdout and "| d | loglik | acc_norm |" in result.stdout
    assert elapsed < 240, elapsed
