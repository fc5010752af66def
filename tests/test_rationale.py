"""`python rationale.py` end to end: the real `openai` client against a local OpenAI-compatible server."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from billa.data.readers import read_records
from billa.openai_client import OpenAIConfigError
from billa.rationale import RationaleError, run
from billa.rationale.prompts import DEFAULT_PROMPT_DIR, LANGS, load_template

from .conftest import CONF, ROOT
from .helpers import start_door
from .openai_server import OpenAIServer, Reply

KEY = "sk-billa-test-9f8e7d6c5b4a"
KEY_ENV = "BILLA_RATIONALE_TEST_KEY"
GOLD = re.compile(r"^(?:正确答案|正确选项|Correct answer|Correct option|Reference summary)：?:?\s*(.+)$", re.MULTILINE)
RECORD_ID = re.compile(r"\[(r\d+)\]")

TASKS = [
    {"id": "zh-1", "input": "[r1] 小明有3个苹果，又买了2个，现在有几个？", "output": "x=3+2", "type": "ape210k"},
    {"id": "zh-2", "input": "[r2] 一本书100页，3天看完，平均每天看几页？", "output": "x=100/3", "type": "math23k"},
    {
        "id": "en-1",
        "input": "[r3] Tom has 12 pens and gives away 5. How many are left?",
        "output": "#### 7",
        "type": "gsm8k",
    },
    {
        "id": "en-2",
        "input": "[r4] What is 6 x 7? Options: a ) 40 , b ) 42 , c ) 44 , d ) 48",
        "output": "b",
        "type": "mathqa",
    },
    {
        "id": "en-3",
        "input": "[r5] Passage 1: ... Passage 2: ... Are both American?",
        "output": "yes",
        "type": "hotpotqa",
    },
    {"id": "en-4", "input": "[r6] A long news article about rain.", "output": "It rained.", "type": "summary"},
    {"id": "wrong", "input": "[r7] always-wrong: 2 + 2 = ?", "output": "4", "type": "gsm8k"},
    {"id": "nogold", "input": "[r8] What is the area?", "output": "unknown", "type": "gsm8k"},
]


def fake_model(messages: list[dict], body: dict) -> str:
    """A model that explains the answer it is given (and gets 'always-wrong' problems wrong)."""
    user = messages[-1]["content"]
    answer = GOLD.findall(user)[-1].strip()
    if "always-wrong" in user:
        answer = "999"
    if "正确答案" in user or "正确选项" in user:
        return f"第一步：读题。\n第二步：列式计算。\n答案为{answer}。"
    return f"Step 1: read the problem.\nStep 2: compute.\nTherefore, the answer is {answer}."


def write_tasks(path: Path, tasks: list[dict]) -> Path:
    path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks), encoding="utf-8")
    return path


def compose_rationale(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("rationale", overrides=overrides)


def overrides(server: OpenAIServer, tmp_path: Path, tasks: Path, *extra: str) -> list[str]:
    return [
        f"input={tasks}",
        f"output={tmp_path / 'out' / 'rationales.jsonl'}",
        f"client.base_url={server.url}",
        "client.model=test-model",
        f"client.api_key_env={KEY_ENV}",
        "client.backoff_s=0.01",
        "client.timeout_s=1.5",  # generous: only Reply.slow() may time out, even on a loaded machine
        "client.max_concurrency=3",
        "progress=false",
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def test_rationales_written_checked_and_readable_as_stage2_source(openai_server, key, tmp_path, caplog):
    """Accepted records end in the gold answer and read as `task` records; the always-wrong record costs exactly
    answer_attempts requests and lands in the rejected file (bugs: wrong answers written as training data; retry
    budget unbounded; a record with an unreadable gold label sent to the API)."""
    openai_server.respond = fake_model
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS)
    summary = run(compose_rationale(overrides(openai_server, tmp_path, tasks, "answer_attempts=3")))
    assert (summary["done"], summary["rejected"], summary["failed"]) == (6, 2, 0)
    assert summary["requests"] == 9 and summary["retries"] == 0
    # token usage as the server reported it (the test server counts words)
    served = [r.user_text + "\n" for r in openai_server.chat_requests()]
    assert summary["prompt_tokens"] > sum(len(u.split()) for u in served) > 0
    assert summary["total_tokens"] == summary["prompt_tokens"] + summary["completion_tokens"]

    out = tmp_path / "out" / "rationales.jsonl"
    records = {r["id"]: r for r in read_jsonl(out)}
    assert set(records) == {"zh-1", "zh-2", "en-1", "en-2", "en-3", "en-4"}
    assert records["zh-1"]["output"] == "第一步：读题。\n第二步：列式计算。\n答案为5。"
    assert records["zh-2"]["output"].endswith("答案为100/3。")
    assert records["en-1"]["output"].endswith("\nTherefore, the answer is 7.")
    assert records["en-2"]["output"].endswith("\nTherefore, the answer is (B).")
    assert records["en-4"]["output"].endswith("\nSummary: It rained.")  # unchecked type: answer line appended
    assert records["zh-1"]["input"] == TASKS[0]["input"] and records["zh-1"]["type"] == "ape210k"

    # the output is a stage-2 task source as it stands
    read = list(read_records(str(out), "task", "data.sources.en-reasoning.train"))
    assert len(read) == 6 and all(r.fields["output"].strip() for r in read)

    rejected = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "rationales.rejected.jsonl")}
    assert set(rejected) == {"wrong", "nogold"}
    assert rejected["wrong"]["reasons"] == [f"answer {i}: final answer 999 != gold 4" for i in (1, 2, 3)]
    assert rejected["nogold"]["reason"].startswith("gold answer unreadable: no numeric gold answer")
    requested = [RECORD_ID.search(r.user_text).group(1) for r in openai_server.chat_requests()]
    assert requested.count("r7") == 3 and "r8" not in requested and len(requested) == 6 + 3

    for path in (tmp_path / "out").iterdir():  # output, rejected and responses files
        assert KEY not in path.read_text(encoding="utf-8"), path
    assert KEY not in caplog.text

    again = run(compose_rationale(overrides(openai_server, tmp_path, tasks, "answer_attempts=3")))
    assert (again["done"], again["rejected"], again["finished_before"]) == (0, 0, 8)  # rejected ids are final too
    assert len(openai_server.chat_requests()) == 9


def test_output_plugs_into_stage2_with_one_override(compose, tmp_path):
    """The README's flow: `stage=task_mix data=billa data.sources.en-reasoning.train=<output>` composes to a task
    source read by the task reader (bug: the documented override names a source or key that does not exist)."""
    out = tmp_path / "rationales.jsonl"
    cfg = compose(["stage=task_mix", "data=billa", f"data.sources.en-reasoning.train={out}"])
    source = cfg.data.sources["en-reasoning"]
    assert (source.kind, source.format, source.train) == ("task", "task", str(out))
    assert cfg.data.mix["en-reasoning"] >= 1


def test_429_500_timeouts_and_malformed_json_are_survived(openai_server, key, tmp_path):
    """Every fault kind on the way; every record still done once (bug: a transient fault drops a record)."""
    openai_server.respond = fake_model
    faults = [
        Reply.rate_limited(0.05),
        Reply.server_error(500),
        Reply.malformed(),
        Reply.slow(4.0),
        Reply.server_error(503),
    ]
    openai_server.inject(*faults)
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:6])
    summary = run(compose_rationale(overrides(openai_server, tmp_path, tasks)))
    assert (summary["done"], summary["rejected"], summary["failed"]) == (6, 0, 0)
    assert summary["requests"] == 6 + len(faults) and summary["retries"] == len(faults)
    ids = [r["id"] for r in read_jsonl(tmp_path / "out" / "rationales.jsonl")]
    assert sorted(ids) == sorted(t["id"] for t in TASKS[:6])


def test_exhausted_retries_fail_the_record_and_a_rerun_retries_it(openai_server, key, tmp_path):
    """A record whose requests all fail is counted failed, not written; the next run does it (bug: written as
    rejected training-data loss, or never retried)."""
    openai_server.respond = fake_model
    openai_server.fault = lambda request: Reply.server_error(500) if "[r3]" in request.user_text else None
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:3])
    summary = run(compose_rationale(overrides(openai_server, tmp_path, tasks, "client.max_retries=2")))
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "rationales.rejected.jsonl")] == []

    openai_server.fault = None
    summary = run(compose_rationale(overrides(openai_server, tmp_path, tasks)))
    assert (summary["done"], summary["failed"], summary["finished_before"]) == (1, 0, 2)
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "out" / "rationales.jsonl")) == ["en-1", "zh-1", "zh-2"]


def test_missing_key_and_unreachable_endpoint_stop_before_any_record(openai_server, monkeypatch, tmp_path):
    """No key / nothing listening: a clear error and nothing processed (bug: every record fails one by one)."""
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:3])
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(OpenAIConfigError, match=f"{KEY_ENV} is unset or empty"):
        run(compose_rationale(overrides(openai_server, tmp_path, tasks)))
    assert openai_server.requests == []

    monkeypatch.setenv(KEY_ENV, KEY)
    url = openai_server.url
    openai_server.stop()
    with pytest.raises(OpenAIConfigError, match="cannot reach .*client.base_url"):
        run(compose_rationale([*overrides(openai_server, tmp_path, tasks), f"client.base_url={url}"]))
    assert read_jsonl(tmp_path / "out" / "rationales.jsonl") == []


def test_dry_run_prints_prompts_and_estimate_without_key_or_network(capsys, monkeypatch, tmp_path):
    """Dry run needs no key and sends nothing; it shows the rendered prompt with the gold answer and a token
    estimate (bug: dry run contacting the API or printing unrendered templates)."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS)
    argv = [f"input={tasks}", f"output={tmp_path / 'o.jsonl'}", "client.base_url=http://127.0.0.1:9/v1", "dry_run=true"]
    summary = run(compose_rationale([*argv, f"client.api_key_env={KEY_ENV}", "dry_run_records=2"]))
    printed = capsys.readouterr().out
    assert "template=math.zh" in printed and "正确答案：5" in printed and "{input}" not in printed
    assert "template=math.en" not in printed  # only dry_run_records=2 prompts: zh-1 and zh-2
    assert summary["pending"] == 8 and summary["max_completion_tokens"] == 8 * 1024
    assert summary["gold_unreadable"] == 1  # "nogold": its output "unknown" is no number
    assert 8 * 40 < summary["estimated_prompt_tokens"] < 8 * 400
    assert f"~{summary['estimated_prompt_tokens']:,} prompt tokens" in printed
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_input_is_reported_before_any_request(openai_server, key, tmp_path):
    """Malformed record, duplicate id, unknown type: errors naming file:line, zero requests; on_error=skip goes on."""
    openai_server.respond = fake_model
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "input": "q", "output": "1", "type": "gsm8k"}\n{"id": "b", "input": "q"}\n')
    with pytest.raises(RationaleError, match=rf"{bad}:2: task record lacks string field\(s\) input/output"):
        run(compose_rationale(overrides(openai_server, tmp_path, bad)))
    dup = write_tasks(tmp_path / "dup.jsonl", [TASKS[0], TASKS[1], TASKS[0]])
    with pytest.raises(RationaleError, match=rf"{dup}:3: id 'zh-1' already used at {dup}:1"):
        run(compose_rationale(overrides(openai_server, tmp_path, dup)))
    odd = write_tasks(tmp_path / "odd.jsonl", [{**TASKS[0], "type": "poetry"}])
    with pytest.raises(RationaleError, match=rf"{odd}:1: record type 'poetry' has no template"):
        run(compose_rationale(overrides(openai_server, tmp_path, odd)))
    assert openai_server.requests == []
    summary = run(compose_rationale([*overrides(openai_server, tmp_path, bad), "on_error=skip"]))
    assert (summary["done"], summary["skipped"]) == (1, 1)


def test_a_broken_template_is_reported_before_any_request(openai_server, key, tmp_path):
    """A custom prompt_dir whose template has a typo in a placeholder: error naming file and field, no request."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for lang in LANGS:
        text = (DEFAULT_PROMPT_DIR / f"math.{lang}.yaml").read_text(encoding="utf-8")
        (prompts / f"math.{lang}.yaml").write_text(text.replace("{input}", "{problem}"), encoding="utf-8")
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:1])
    argv = overrides(openai_server, tmp_path, tasks, f"prompt_dir={prompts}")  # only the families in use must exist
    with pytest.raises(RationaleError, match=rf":1: {prompts}/math\.zh\.yaml: field user: bad placeholder 'problem'"):
        run(compose_rationale(argv))
    assert openai_server.requests == []


def test_every_template_file_loads_and_renders():
    """The config composes and instantiates; each configured family has a zh and an en template that renders both
    placeholders (bug: a template file missing or with a typo in a placeholder, found only mid-run)."""
    cfg = compose_rationale(["input=x.jsonl", "output=y.jsonl"])
    client = instantiate(cfg.client, cache_path=None)  # no network and no key needed to build it
    assert (client.model, client.max_concurrency, client.params["temperature"]) == ("gpt-3.5-turbo", 8, 0.7)
    families = set(cfg.templates.values())
    assert families == {"math", "choice", "multihop_qa", "reading_comprehension", "summary", "code"}
    for family in families:
        for lang in LANGS:
            template = load_template(DEFAULT_PROMPT_DIR / f"{family}.{lang}.yaml")
            user = template.messages("THE-INPUT", "THE-ANSWER")[-1]["content"]
            assert "THE-INPUT" in user and "THE-ANSWER" in user and "{" not in user


def test_stopped_run_resumes_without_duplicates_or_repaid_answers(openai_server, key, tmp_path):
    """A run stopped mid-way (the key revoked: 401 is fatal) and rerun: every record once, and answers that arrived
    but were not yet written are re-read from the response cache (bugs: duplicates; paying twice for in-flight
    answers; a revoked key failing every remaining record one by one instead of stopping)."""
    answered: list[str] = []

    def counting_model(messages, body):
        answered.append(RECORD_ID.search(messages[-1]["content"]).group(1))
        time.sleep(0.02)
        return fake_model(messages, body)

    openai_server.respond = counting_model
    openai_server.fault = lambda request: Reply.server_error(401) if len(answered) >= 5 else None
    n = 12
    tasks = write_tasks(
        tmp_path / "tasks.jsonl",
        [{"id": f"t{i}", "input": f"[r{i}] {i} + 1 = ?", "output": str(i + 1), "type": "gsm8k"} for i in range(n)],
    )
    with pytest.raises(RationaleError, match="stopping: HTTP 401"):
        run(compose_rationale(overrides(openai_server, tmp_path, tasks)))
    out = tmp_path / "out" / "rationales.jsonl"
    written_first = [r["id"] for r in read_jsonl(out)]
    answered_first = set(answered)
    assert 1 <= len(written_first) <= len(answered_first) < n
    with open(out, "a", encoding="utf-8") as f:  # a writer killed mid-line leaves a partial last line
        f.write('{"id": "t11", "input": "[r11] 11 + 1')

    openai_server.fault = None
    summary = run(compose_rationale(overrides(openai_server, tmp_path, tasks)))
    assert summary["cached"] == len(answered_first) - len(written_first)  # answered, not yet written: no new request
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(f"t{i}" for i in range(n))
    assert sorted(answered) == sorted(f"r{i}" for i in range(n))  # each record answered (paid) exactly once
    assert len(list(read_records(str(out), "task", "data.sources.en-reasoning.train"))) == n


def _run_cli(server: OpenAIServer, tasks: Path, out: Path, run_dir: Path, key: str | None = KEY) -> subprocess.Popen:
    return start_door(
        "rationale.py",
        f"input={tasks}",
        f"output={out}",
        f"client.base_url={server.url}",
        f"client.api_key_env={KEY_ENV}",
        "client.max_concurrency=2",
        "client.backoff_s=0.01",
        f"hydra.run.dir={run_dir}",
        env={"PYTHONPATH": str(ROOT / "src"), KEY_ENV: key},
    )


@pytest.mark.slow  # two CLI start-ups (~4 s each here: importing openai); the in-process twin above is fast
def test_killed_run_resumes_exactly_once_without_repaying(openai_server, tmp_path):
    """SIGKILL mid-run, then the same command again: every record written exactly once, no finished record asked
    again, and the key in no output, log or config dump (bugs: duplicates after resume; done ids re-requested;
    the key leaking into Hydra's .hydra/config.yaml or the job log)."""

    def slow_model(messages, body):
        time.sleep(0.05)
        return fake_model(messages, body)

    openai_server.respond = slow_model
    n = 40
    tasks = write_tasks(
        tmp_path / "tasks.jsonl",
        [{"id": f"t{i}", "input": f"[r{i}] {i} + 1 = ?", "output": str(i + 1), "type": "gsm8k"} for i in range(n)],
    )
    out = tmp_path / "data" / "rationales.jsonl"
    no_key = _run_cli(openai_server, tasks, out, tmp_path / "run0", key=None)
    _, err = no_key.communicate(timeout=60)
    assert no_key.returncode == 2 and f"billa: error: no API key: the environment variable {KEY_ENV}" in err
    assert "Traceback" not in err and openai_server.requests == []

    first = _run_cli(openai_server, tasks, out, tmp_path / "run1")
    deadline = time.monotonic() + 60
    while len(read_jsonl(out)) < 10 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first_out, first_err = first.communicate(timeout=30)
    done_first = {r["id"] for r in read_jsonl(out)}
    assert 10 <= len(done_first) < n, first_err[-2000:]
    requests_first = len(openai_server.chat_requests())

    second = _run_cli(openai_server, tasks, out, tmp_path / "run2")
    second_out, second_err = second.communicate(timeout=120)
    assert second.returncode == 0, second_err[-3000:]
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(f"t{i}" for i in range(n))  # each exactly once
    asked_again = {RECORD_ID.search(r.user_text).group(1) for r in openai_server.chat_requests()[requests_first:]}
    assert not asked_again & {f"r{t[1:]}" for t in done_first}
    assert len(openai_server.chat_requests()) <= n + 2  # at most the 2 in flight at the kill were lost
    assert "done=" in second_err and "rejected=" in second_err and "tokens=" in second_err  # progress bar

    dumped = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in dumped) and any(p.suffix == ".log" for p in dumped)
    for path in dumped:
        assert KEY not in path.read_text(encoding="utf-8", errors="replace"), path
    for text in (first_out, first_err, second_out, second_err):
        assert KEY not in text


def test_bodies_cut_inside_a_character_never_stop_the_run(openai_server, key, tmp_path, caplog):
    """60 Chinese records; some answers arrive as complete HTTP messages whose body was cut inside a UTF-8 character.
    Bug caught: the openai client's UnicodeDecodeError not treated as a malformed body, so rationale.py died after
    46 of 60 records; every record must finish and the malformed bodies be counted in the summary and the log."""
    import logging
    import threading

    cuts, lock, tries = [], threading.Lock(), {}

    def fault(request):
        record = int(RECORD_ID.search(request.user_text).group(1)[1:])
        with lock:
            tries[record] = tries.get(record, 0) + 1
            if tries[record] <= record % 3:  # records 1, 4, 7 ...: first try cut; 2, 5, 8 ...: first two
                cuts.append(record)
                return Reply.cut(fake_model(request.messages, request.body))
        return None

    openai_server.respond, openai_server.fault = fake_model, fault
    records = [
        {
            "id": f"zh-{i}",
            "input": f"[r{i}] 小明有{i}个苹果，又买了2个，现在有几个？",
            "output": f"x={i}+2",
            "type": "ape210k",
        }
        for i in range(60)
    ]
    tasks = write_tasks(tmp_path / "tasks.jsonl", records)
    with caplog.at_level(logging.INFO, logger="billa"):
        summary = run(compose_rationale(overrides(openai_server, tmp_path, tasks, "client.requests_per_minute=null")))
    assert len(cuts) == 20 + 2 * 20
    assert (summary["done"], summary["rejected"], summary["failed"]) == (60, 0, 0)
    assert summary["malformed"] == summary["retries"] == len(cuts) and summary["requests"] == 60 + len(cuts)
    out = read_jsonl(tmp_path / "out" / "rationales.jsonl")
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in records)
    assert all(r["output"].endswith(f"答案为{int(r['id'][3:]) + 2}。") for r in out)  # whole answers, not cut ones
    assert f"{len(cuts)} answers arrived with a malformed body" in caplog.text


def test_every_sample_task_file_reads_every_gold_answer(sample_corpus, tmp_path):
    """The embedded sample's own stage-2 tasks must pass rationale.py: a dry run over every task file reads every
    record's gold answer (bug caught: en-reasoning's 108 numeric word problems typed mathqa, whose choice template
    cannot read "the answer is 12", so each would be rejected without a request)."""
    task_dir = sample_corpus / "tasks" / "train"
    # types of the sample that conf/rationale.yaml does not list yet (++: also right once it does)
    extra = [
        "++templates.webqa=reading_comprehension",
        "++templates.cnndm-gen-abs=summary",
        "++templates.samsum=summary",
    ]
    argv = [f"input={task_dir}", f"output={tmp_path / 'o.jsonl'}", "dry_run=true", "dry_run_records=0", *extra]
    summary = run(compose_rationale(argv))
    assert summary["records"] == sum(1 for f in task_dir.glob("*.jsonl") for _ in f.open()) >= 1000
    assert summary["gold_unreadable"] == 0
    types = {json.loads(line)["type"] for line in (task_dir / "en-reasoning.jsonl").open()}
    assert types == {"gsm8k", "mathqa"}  # numbers and option letters, each with the template that reads it


@pytest.mark.slow  # one CLI start-up (~4 s: importing openai)
def test_credentials_in_base_url_leave_no_trace_in_hydra_files_or_output(tmp_path):
    """``client.base_url=http://user:key@host/v1`` on the command line. Bug caught: Hydra writing the key into
    .hydra/overrides.yaml, hydra.yaml and config.yaml (and the job log) before the job starts."""
    from .helpers import run_door

    secret = "sk-url-secret-0123456789abcdef"
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:2])
    base_url = f"http://billa:{secret}@127.0.0.1:9/v1"
    argv = [f"input={tasks}", f"output={tmp_path / 'o.jsonl'}", f"client.base_url={base_url}", "dry_run=true"]
    result = run_door("rationale.py", *argv, f"hydra.run.dir={tmp_path / 'run'}", env={"PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    hydra_files = sorted((tmp_path / "run" / ".hydra").glob("*.yaml"))
    assert [p.name for p in hydra_files] == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    for path in [*hydra_files, *(tmp_path / "run").glob("*.log")]:
        assert secret not in path.read_text(encoding="utf-8"), path
    assert "client.base_url=http://***@127.0.0.1:9/v1" in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()
    assert secret not in result.stdout + result.stderr
