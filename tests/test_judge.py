"""The pairwise judge against a local OpenAI-compatible server (real `openai` client, real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import re

import pytest

from billa.evaluate.judge import judge, parse_first_line, parse_last_line_tuple
from billa.openai_client import ChatClient, UnparsableResponse

from .openai_server import OpenAIServer, Reply

KEY = "sk-judge-test-9f8e7d6c5b4a"
# question_id -> (category as in the question file, score of A, score of B) before the position bonus
BASE = {
    1: ("generic", 7, 5),
    2: ("generic", 6, 6),
    3: ("coding", 8, 4),
    4: ("coding", 5, 7),
    5: ("math", 9, 3),
    6: ("math", 4, 8),
    7: ("closed qa", 6, 6),
    8: ("closed qa", 7, 7),
}
BONUS = 1  # the scripted judge favours Assistant 1 by one point, as real judges favour a position


def _write_answers(tmp_path):
    files = []
    for side in "AB":
        path = tmp_path / f"answers-{side}.jsonl"
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "question_id": q,
                        "text": f"answer-{side}-q{q}",
                        "answer_id": f"{side}{q}",
                        "model_id": f"model-{side}",
                        "metadata": {},
                    }
                )
                + "\n"
                for q in BASE
            )
        )
        files.append(str(path))
    return files


def scripted_judge(messages, body) -> str:
    """Scores from BASE, +BONUS for whoever is shown first; math reviews end with a tuple, others start with scores."""
    text = messages[-1]["content"]
    first = re.search(r"Assistant 1's Answer\]\nanswer-([AB])-q(\d+)", text)
    side, q = first.group(1), int(first.group(2))
    _, a, b = BASE[q]
    one, two = (a + BONUS, b) if side == "A" else (b + BONUS, a)
    if "math question above" in text:
        return f"Let me solve it first.\nAssistant 1 is ...\n({one}, {two})"
    return f"{one} {two}\nAssistant 1 was ..."


def _client(server: OpenAIServer, cache, **kwargs) -> ChatClient:
    options = dict(max_retries=5, backoff_s=0.01, backoff_max_s=0.2, timeout_s=2.0, seed=0, max_concurrency=4)
    return ChatClient(
        "gpt-4",
        base_url=server.url,
        api_key_env="BILLA_TEST_JUDGE_KEY",
        cache_path=cache,
        params={"temperature": 0.2},
        **{**options, **kwargs},
    )


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("BILLA_TEST_JUDGE_KEY", KEY)


def _reviewers():
    import yaml

    from .conftest import CONF

    node = yaml.safe_load((CONF / "task" / "judge.yaml").read_text())["judge"]
    return {"reviewers": node["reviewers"], "category_reviewer": node["category_reviewer"]}


def _expected(questions):
    """Per-order and mean scores of A and B computed from BASE by hand."""
    a_ab = [BASE[q][1] + BONUS for q in questions]
    a_ba = [BASE[q][1] for q in questions]
    b_ab = [BASE[q][2] for q in questions]
    b_ba = [BASE[q][2] + BONUS for q in questions]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    flips = [
        ((BASE[q][1] + BONUS > BASE[q][2]) - (BASE[q][1] + BONUS < BASE[q][2]))
        != ((BASE[q][1] > BASE[q][2] + BONUS) - (BASE[q][1] < BASE[q][2] + BONUS))
        for q in questions
    ]
    return {
        "a_ab": mean(a_ab),
        "a_ba": mean(a_ba),
        "b_ab": mean(b_ab),
        "b_ba": mean(b_ba),
        "a": mean(a_ab + a_ba),
        "b": mean(b_ab + b_ba),
        "flip": mean([float(f) for f in flips]),
    }


def test_both_orders_categories_micro_macro_and_flips(openai_server, key_env, tmp_path):
    """Catches: scores not swapped back for order ba, math parsed with the wrong format, macro = micro."""
    openai_server.respond = scripted_judge
    result = judge(
        _client(openai_server, tmp_path / "cache.jsonl"),
        _write_answers(tmp_path),
        str(tmp_path / "out"),
        **_reviewers(),
    )
    m = result.metrics
    categories = {"generic": [1, 2], "coding": [3, 4], "math": [5, 6], "closed qa": [7, 8]}
    for category, questions in categories.items():
        e = _expected(questions)
        assert m[f"{category}/a/order_ab"] == pytest.approx(e["a_ab"]) and m[f"{category}/b/order_ba"] == e["b_ba"]
        assert m[f"{category}/a/mean"] == pytest.approx(e["a"]) and m[f"{category}/b/mean"] == pytest.approx(e["b"])
        assert m[f"{category}/flip_rate"] == pytest.approx(e["flip"])
    micro = _expected(list(BASE))
    assert m["micro/a/mean"] == pytest.approx(micro["a"]) and m["micro/flip_rate"] == pytest.approx(3 / 8)
    assert m["macro/a/mean"] == pytest.approx(sum(_expected(q)["a"] for q in categories.values()) / 4)
    assert m["macro/flip_rate"] == pytest.approx((0.5 + 0 + 0 + 1.0) / 4)
    assert m["position_bias"] == pytest.approx(BONUS)  # ab: (a+1)-b, ba: (b+1)-a; their mean is the bonus
    assert m["flagged"] == 0
    table = result.tables["pairwise"]
    assert table.columns[2] == "model-A (A first)" and [r[0] for r in table.rows][-2:] == ["micro", "macro"]
    math_requests = [r for r in openai_server.chat_requests() if "math question above" in r.user_text]
    assert len(math_requests) == 4 and all(r.body["temperature"] == 0.2 for r in math_requests)


def test_malformed_reviews_are_retried_then_flagged_never_zero(openai_server, key_env, tmp_path):
    """Catches: an unparsable review scored 0 (or dropped silently) instead of re-asked and then flagged."""
    seen = []

    def responder(messages, body):
        text = messages[-1]["content"]
        if "answer-A-q2" in text:
            return "Both answers are fine, I would not rank them."  # never parsable
        if "Assistant 1's Answer]\nanswer-A-q1" in text and not seen:
            seen.append(1)
            return "Score: eight out of ten"  # the first try is unparsable, the second is fine
        return scripted_judge(messages, body)

    openai_server.respond = responder
    result = judge(
        _client(openai_server, tmp_path / "cache.jsonl"),
        _write_answers(tmp_path),
        str(tmp_path / "out"),
        attempts=2,
        **_reviewers(),
    )
    m = result.metrics
    assert m["flagged"] == 2
    assert sorted((r["question_id"], r["order"], r["status"]) for r in result.details["flagged"]) == [
        (2, "ab", "unparsable"),
        (2, "ba", "unparsable"),
    ]
    e = _expected([1])
    assert m["generic/a/mean"] == pytest.approx(e["a"]) and m["generic/b/mean"] == pytest.approx(e["b"])
    reviews = [json.loads(line) for line in (tmp_path / "out" / "judge_reviews.jsonl").read_text().splitlines()]
    q1 = next(r for r in reviews if r["question_id"] == 1 and r["order"] == "ab")
    assert q1["attempts"] == 2 and q1["status"] == "ok"
    assert len(reviews) == 16


def test_429s_and_timeouts_lose_nothing_duplicate_nothing_and_rerun_hits_the_cache(openai_server, key_env, tmp_path):
    """Catches: a review lost or written twice after retries; a rerun paying again for answers it already has."""
    openai_server.respond = scripted_judge
    openai_server.inject(
        Reply.rate_limited(0.05), Reply.slow(1.0), Reply.server_error(503), Reply.rate_limited(0.02), Reply.malformed()
    )
    files = _write_answers(tmp_path)
    cache = tmp_path / "cache.jsonl"
    first = judge(_client(openai_server, cache, timeout_s=0.5), files, str(tmp_path / "run1"), **_reviewers())
    reviews = [json.loads(line) for line in (tmp_path / "run1" / "judge_reviews.jsonl").read_text().splitlines()]
    keys = [(r["question_id"], r["order"]) for r in reviews]
    assert len(keys) == len(set(keys)) == 16 and all(r["status"] == "ok" for r in reviews)
    assert len(openai_server.chat_requests()) == 16 + 5
    assert first.details["usage"]["retries"] == 5
    rerun = judge(_client(openai_server, cache), files, str(tmp_path / "run2"), **_reviewers())
    assert len(openai_server.chat_requests()) == 16 + 5  # nothing sent again
    assert rerun.details["usage"]["cached"] == 16 and rerun.metrics == first.metrics
    assert (tmp_path / "run2" / "judge_reviews.jsonl").read_text().replace("true", "false") == (
        tmp_path / "run1" / "judge_reviews.jsonl"
    ).read_text().replace("true", "false")
    for path in [cache, tmp_path / "run1" / "judge_reviews.jsonl"]:
        assert KEY not in path.read_text()


def test_missing_answer_names_the_file_and_question(openai_server, key_env, tmp_path):
    files = _write_answers(tmp_path)
    lines = open(files[1]).read().splitlines()
    open(files[1], "w").write("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"answers-B.jsonl: no answer to question_id \[8\]"):
        judge(_client(openai_server, None), files, str(tmp_path), **_reviewers())


@pytest.mark.parametrize(
    "parse,text,expected",
    [
        (parse_first_line, "8 6\nbecause", (8.0, 6.0)),
        (parse_first_line, "\n 7.5, 10 \nok", (7.5, 10.0)),
        (parse_first_line, "Assistant 1: 8\nAssistant 2: 6", None),
        (parse_first_line, "8 6 5\n", None),
        (parse_first_line, "0 6", None),  # outside 1-10
        (parse_first_line, "11 6", None),
        (parse_last_line_tuple, "work...\n(9, 3)", (9.0, 3.0)),
        (parse_last_line_tuple, "(9, 3)\nmore text", None),
        (parse_last_line_tuple, "", None),
    ],
)
def test_strict_score_parsing(parse, text, expected):
    if expected is None:
        with pytest.raises(UnparsableResponse):
            parse(text)
    else:
        assert parse(text) == expected


def _chinese_review(messages, body) -> str:
    """The scripted review with a Chinese explanation, so a cut body can fall inside a multi-byte character."""
    text = scripted_judge(messages, body)
    return "先自己解题，再逐一核对。\n" + text if text.endswith(")") else text + "\n理由：回答一更完整，解释更清楚。"


def test_bodies_cut_inside_a_character_are_retried_counted_and_never_fatal(openai_server, key_env, tmp_path):
    """Some reviews arrive as complete HTTP messages whose body was cut inside a UTF-8 character. Bug caught: the
    UnicodeDecodeError this raises in the openai client escaping the retry loop and ending the judge run; or the
    retried reviews scored differently / lost, or the malformed bodies going uncounted."""
    import threading

    cuts, lock, seen = [], threading.Lock(), set()

    def fault(request):
        text = request.user_text
        question = int(re.search(r"answer-[AB]-q(\d+)", text).group(1))
        with lock:
            first = text not in seen
            seen.add(text)
            if question % 2 and first:  # the first try of every odd question's reviews (both orders)
                cuts.append(question)
                return Reply.cut(_chinese_review(request.messages, request.body))
        return None

    openai_server.respond, openai_server.fault = _chinese_review, fault
    result = judge(
        _client(openai_server, tmp_path / "cache.jsonl"),
        _write_answers(tmp_path),
        str(tmp_path / "out"),
        **_reviewers(),
    )
    assert len(cuts) == 8  # questions 1, 3, 5, 7 in both orders
    assert result.metrics["flagged"] == 0 and result.details["usage"]["malformed"] == 8
    assert result.details["usage"]["requests"] == 16 + 8 and result.details["usage"]["retries"] == 8
    micro = _expected(list(BASE))
    assert result.metrics["micro/a/mean"] == pytest.approx(micro["a"]) and result.metrics["position_bias"] == BONUS


def test_judge_md_names_the_models_and_shows_the_position_bias(openai_server, key_env, tmp_path):
    """judge.md, as evaluate.py writes it. Bugs caught: the position bias the README promises missing from the table
    (only in the JSON), and nothing in the file saying which models were compared or who judged."""
    from billa.evaluate.results import write_result

    openai_server.respond = scripted_judge
    result = judge(
        _client(openai_server, tmp_path / "cache.jsonl"),
        _write_answers(tmp_path),
        str(tmp_path / "out"),
        **_reviewers(),
    )
    table = result.tables["pairwise"]
    bias = table.columns.index("position bias")
    assert [row[bias] for row in table.rows] == [BONUS] * 6  # 4 categories, micro, macro: Assistant 1 +1 each time
    assert result.metrics["coding/position_bias"] == BONUS
    write_result(tmp_path / "out", "judge", result, header=result.details["header"])
    markdown = (tmp_path / "out" / "judge.md").read_text()
    header_row = next(line for line in markdown.splitlines() if line.startswith("| category |"))
    assert "| verdict flips | position bias | flagged |" in header_row
    assert "| A | model-A | " in markdown and "| B | model-B | " in markdown and "| judge | gpt-4 | http://" in markdown
    assert "models: A = model-A, B = model-B; judge: gpt-4 at http://127.0.0.1:" in markdown


def test_every_verdict_goes_to_wandb_as_a_table(openai_server, key_env, tmp_path, monkeypatch):
    """Catches: judge verdicts kept only in judge_reviews.jsonl (no per-review W&B table), or the table's scores left
    in shown order for ``ba`` reviews (B's score under A)."""
    from billa.evaluate.results import log_result
    from billa.utils.loggers import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    openai_server.respond = scripted_judge
    client = _client(openai_server, tmp_path / "cache.jsonl")
    result = judge(client, _write_answers(tmp_path), str(tmp_path / "out"), **_reviewers())
    logger = wandb_logger("billa", "judge-test", str(tmp_path / "logs"))
    log_result(logger, "judge", result)
    logger.experiment.finish()
    files = list((tmp_path / "logs" / "wandb").rglob("judge/verdicts_*.table.json"))
    assert len(files) == 1
    table = json.loads(files[0].read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert len(rows) == 2 * len(BASE)  # every question in both orders
    for row in rows:
        _, a, b = BASE[row["question_id"]]
        bonus_a, bonus_b = (BONUS, 0) if row["order"] == "ab" else (0, BONUS)
        assert (row["score_a"], row["score_b"]) == (a + bonus_a, b + bonus_b)
