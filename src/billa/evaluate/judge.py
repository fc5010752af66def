"""Pairwise review of two answer files by an OpenAI-compatible chat model, in both answer orders.

FastChat's v1 review (the one behind BiLLa's GPT-4 tables) shows the question and two answers as "Assistant 1" and
"Assistant 2" and asks for two 1-10 scores; BiLLa showed its model's answer in one position only, and judges favour
a position. Here every question is reviewed twice, with A first (order ``ab``) and with B first (``ba``); the
table reports each model's mean score per order, the mean of both orders, how often the verdict (who scored
higher) flips when the order flips, and the position bias (mean score of Assistant 1 minus Assistant 2), per category
and over all; a second table names the two models, their answer files and the judge.

Scores are parsed strictly per reviewer (``first_line``: "8 6" alone on the first line; ``last_line_tuple``: "(8, 6)"
alone on the last line, for math). An unparsable review is asked again (``attempts``), then flagged: flagged and
failed reviews are listed in the output and left out of the means, never counted as zero. Requests go through
``billa.openai_client.ChatClient``: bounded concurrency, retry with backoff on 429/5xx/timeouts, and a response
cache, so a rerun pays only for what it has not received before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from billa.data.readers import DataFormatError
from billa.evaluate.answers import category_name, load_questions, records_by_question_id
from billa.evaluate.multiple_choice import resolve_path
from billa.evaluate.results import Table, TaskResult, item_table
from billa.openai_client import ChatClient, ChatFailed, ContentRejected, UnparsableResponse
from billa.utils.logging import get_logger
from billa.utils.secrets import redact_text

log = get_logger(__name__)

ORDERS = ("ab", "ba")  # ab: answer A is "Assistant 1"; ba: answer B is
_NUMBER = r"(10(?:\.0+)?|[0-9](?:\.[0-9]+)?)"
_FIRST_LINE = re.compile(rf"^\s*{_NUMBER}\s*(?:,\s*|\s+){_NUMBER}\s*$")
_TUPLE = re.compile(rf"^\s*\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\)\s*$")

REVIEW_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
    "[System]\n{prompt}\n\n"
)


def _scores(values: tuple[str, str], text: str) -> tuple[float, float]:
    scores = (float(values[0]), float(values[1]))
    if not all(1.0 <= s <= 10.0 for s in scores):
        raise UnparsableResponse(f"scores {scores} outside 1-10 in {text[:80]!r}")
    return scores


def parse_first_line(text: str) -> tuple[float, float]:
    """Two scores 1-10 alone on the first non-empty line ("8 6" or "8, 6"); anything else is unparsable."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    match = _FIRST_LINE.match(lines[0]) if lines else None
    if match is None:
        raise UnparsableResponse(f"first line is not two scores: {(lines or [''])[0][:80]!r}")
    return _scores(match.groups(), text)


def parse_last_line_tuple(text: str) -> tuple[float, float]:
    """Two scores 1-10 as a tuple "(8, 6)" alone on the last non-empty line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    match = _TUPLE.match(lines[-1]) if lines else None
    if match is None:
        raise UnparsableResponse(f"last line is not a score tuple: {(lines or [''])[-1][:80]!r}")
    return _scores(match.groups(), text)


PARSERS = {"first_line": parse_first_line, "last_line_tuple": parse_last_line_tuple}


@dataclass(frozen=True)
class Review:
    """One request: a question, the two answers in one order, and the reviewer to use."""

    question_id: object
    category: str
    order: str
    reviewer: str
    messages: tuple


def load_answers(path: str, what: str) -> dict:
    """question_id -> answer record of an answer jsonl (FastChat format); duplicates are an error."""
    return records_by_question_id(resolve_path(path), "an answer {question_id, text, answer_id, model_id}", what)


def _reviews(questions, answers, reviewers, category_reviewer, system) -> list[Review]:
    out = []
    for q in questions:
        category = category_name(q["category"])
        name = category_reviewer.get(category, "general")
        if name not in reviewers:
            raise KeyError(f"judge.category_reviewer.{category}={name!r}: no such reviewer in judge.reviewers")
        texts = {side: answers[side][q["question_id"]]["text"] for side in "ab"}
        for order in ORDERS:
            first, second = texts[order[0]], texts[order[1]]
            content = REVIEW_TEMPLATE.format(
                question=q["text"], answer_1=first, answer_2=second, prompt=reviewers[name]["prompt"]
            )
            messages = ({"role": "system", "content": system}, {"role": "user", "content": content})
            out.append(Review(q["question_id"], category, order, name, messages))
    return out


def judge(
    client: ChatClient,
    answer_files: list[str],
    output_dir: str,
    question_file: str = "fixtures://questions.jsonl",
    labels: list[str] | None = None,
    reviewers: Mapping[str, Mapping] | None = None,
    category_reviewer: Mapping[str, str] | None = None,
    system_prompt: str = "You are a careful and impartial reviewer of answers written by AI assistants.",
    attempts: int = 3,
    preflight: bool = True,
) -> TaskResult:
    """Review answers A and B to every question in both orders; per-category table with micro and macro averages.

    Args:
        client: the chat client (``billa.openai_client.ChatClient``: base_url, model, key from the environment).
        answer_files: two answer jsonl files, A then B.
        output_dir: where ``judge_reviews.jsonl`` (every review, both orders) is written.
        question_file: the questions both files answer.
        labels: names of A and B in tables (default: their ``model_id``).
        reviewers: name -> ``{prompt, score_format}`` (``first_line`` | ``last_line_tuple``); must hold ``general``.
        category_reviewer: category (normalised, e.g. "coding") -> reviewer name; others use ``general``.
        system_prompt: the reviewer's system message.
        attempts: answers asked for per review before it is flagged unparsable.
        preflight: check the endpoint and key before the first review.
    """
    if len(answer_files) != 2:
        raise ValueError(f"judge.answer_files must name two answer files (A and B), got {list(answer_files)}")
    reviewers = dict(reviewers or {})
    if "general" not in reviewers:
        raise KeyError("judge.reviewers needs a `general` reviewer (used for every category without its own)")
    for name, spec in reviewers.items():
        if spec.get("score_format", "first_line") not in PARSERS:
            raise ValueError(f"judge.reviewers.{name}.score_format: expected one of {sorted(PARSERS)}")
    questions = load_questions(question_file, "judge.question_file")
    answers = {
        side: load_answers(path, f"judge.answer_files[{i}]")
        for i, (side, path) in enumerate(zip("ab", answer_files, strict=True))
    }
    for i, side in enumerate("ab"):
        missing = [q["question_id"] for q in questions if q["question_id"] not in answers[side]]
        if missing:
            raise DataFormatError(f"{answer_files[i]}: no answer to question_id {missing[:10]} of {question_file}")
    labels = list(labels or [next(iter(answers[s].values())).get("model_id", s.upper()) for s in "ab"])
    reviews = _reviews(questions, answers, reviewers, dict(category_reviewer or {}), system_prompt)
    if preflight:
        client.preflight()
    results = _run_reviews(client, reviews, reviewers, attempts)
    path = Path(output_dir) / "judge_reviews.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for review in reviews:  # question order, then ab before ba: the same file on every rerun
            handle.write(json.dumps(results[(review.question_id, review.order)], ensure_ascii=False) + "\n")
    result = summarise([results[(r.question_id, r.order)] for r in reviews], labels)
    judge_name = f"{client.model} at {client.where}"
    result.tables["models"] = Table(
        ["role", "name", "source"],
        [["A", labels[0], redact_text(str(answer_files[0]))], ["B", labels[1], redact_text(str(answer_files[1]))]]
        + [["judge", client.model, client.where]],
    )
    result.details["header"] = f"models: A = {labels[0]}, B = {labels[1]}; judge: {judge_name}"
    result.files.append(str(path))
    result.details["usage"] = usage_counts(client)
    log.info("judge: %s", result.details["usage"])
    if result.details["usage"]["malformed"]:
        log.warning("judge: %d answers had a malformed body and were asked again", result.details["usage"]["malformed"])
    return result


def usage_counts(client: ChatClient) -> dict[str, int]:
    """The client's running totals (read field by field: ``Usage.as_dict`` deep-copies its lock and fails)."""
    names = ("requests", "retries", "malformed", "cached", "prompt_tokens", "completion_tokens")
    return {name: int(getattr(client.usage, name)) for name in names}


def _run_reviews(client: ChatClient, reviews: list[Review], reviewers: Mapping, attempts: int) -> dict:
    def ask(review: Review):
        parse = PARSERS[reviewers[review.reviewer].get("score_format", "first_line")]
        return client.chat([dict(m) for m in review.messages], parse=parse, attempts=attempts)

    from tqdm.auto import tqdm

    results = {}
    for review, outcome in tqdm(client.map_unordered(ask, reviews), total=len(reviews), desc="judge", unit="review"):
        record = {
            "question_id": review.question_id,
            "category": review.category,
            "order": review.order,
            "reviewer": review.reviewer,
        }
        if isinstance(outcome, ContentRejected):
            record.update(status="unparsable", reasons=outcome.reasons, text=outcome.last_text)
        elif isinstance(outcome, ChatFailed):
            if outcome.fatal:
                raise outcome
            record.update(status="failed", reasons=[str(outcome)])
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            first, second = outcome.value
            scores = {"a": first, "b": second} if review.order == "ab" else {"a": second, "b": first}
            record.update(
                status="ok",
                scores=scores,
                assistant_1=first,
                assistant_2=second,
                text=outcome.text,
                attempts=outcome.attempts,
                cached=outcome.cached,
            )
        key = (review.question_id, review.order)
        if key in results:
            raise AssertionError(f"review {key} came back twice")
        results[key] = record
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# The per-review W&B table (scores are A's and B's whichever order they were shown in)
VERDICT_COLUMNS = ("question_id", "category", "order", "reviewer", "status", "score_a", "score_b", "text")


def summarise(records: list[dict], labels: list[str]) -> TaskResult:
    """Per category: each model's mean per order and over both, verdict flips; then micro and macro averages."""
    ok = [r for r in records if r["status"] == "ok"]
    categories = sorted({r["category"] for r in records})
    stats = {c: _category_stats([r for r in ok if r["category"] == c]) for c in categories}
    stats["micro"] = _category_stats(ok)
    stats["macro"] = {
        key: _mean([stats[c][key] for c in categories if stats[c]["n"] and stats[c][key] == stats[c][key]])
        for key in stats["micro"]
    }
    stats["macro"]["n"] = len(categories)
    flagged = [r for r in records if r["status"] != "ok"]
    a, b = labels
    columns = [
        "category",
        "questions",
        f"{a} (A first)",
        f"{a} (B first)",
        f"{a} mean",
        f"{b} (A first)",
        f"{b} (B first)",
        f"{b} mean",
        "A/B",
        "verdict flips",
        "position bias",
        "flagged",
    ]
    rows, metrics = [], {}
    for group in [*categories, "micro", "macro"]:
        s = stats[group]
        n_flagged = len([r for r in flagged if r["category"] == group]) if group in categories else len(flagged)
        rows.append(
            [
                group,
                s["n"],
                s["a_ab"],
                s["a_ba"],
                s["a"],
                s["b_ab"],
                s["b_ba"],
                s["b"],
                s["a"] / s["b"] if s["b"] else float("nan"),
                s["flip_rate"],
                s["position_bias"],
                n_flagged,
            ]
        )
        for key in ("a_ab", "a_ba", "b_ab", "b_ba"):
            metrics[f"{group}/{key[0]}/order_{key[2:]}"] = s[key]
        metrics[f"{group}/a/mean"], metrics[f"{group}/b/mean"] = s["a"], s["b"]
        metrics[f"{group}/flip_rate"] = s["flip_rate"]
        metrics[f"{group}/position_bias"] = s["position_bias"]
    metrics["position_bias"] = stats["micro"]["position_bias"]
    metrics["flagged"] = len(flagged)
    details = {"labels": {"a": a, "b": b}, "flagged": flagged}
    if flagged:
        log.warning(
            "judge: %d reviews flagged (unparsable or failed), left out of the means: %s",
            len(flagged),
            [(r["question_id"], r["order"], r["status"]) for r in flagged[:10]],
        )
    verdicts = [
        {**r, "score_a": (r.get("scores") or {}).get("a"), "score_b": (r.get("scores") or {}).get("b")} for r in records
    ]
    return TaskResult(
        metrics=metrics,
        tables={"pairwise": Table(columns, rows)},
        item_tables={"verdicts": item_table(verdicts, list(VERDICT_COLUMNS))},  # every review, both orders
        details=details,
    )


def _category_stats(ok: list[dict]) -> dict:
    by_order = {o: [r for r in ok if r["order"] == o] for o in ORDERS}
    by_question: dict = {}
    for r in ok:
        by_question.setdefault(r["question_id"], {})[r["order"]] = r["scores"]

    def verdict(scores: dict) -> int:
        return (scores["a"] > scores["b"]) - (scores["a"] < scores["b"])

    both = [v for v in by_question.values() if len(v) == 2]
    return {
        "n": len(by_question),
        "a_ab": _mean([r["scores"]["a"] for r in by_order["ab"]]),
        "a_ba": _mean([r["scores"]["a"] for r in by_order["ba"]]),
        "b_ab": _mean([r["scores"]["b"] for r in by_order["ab"]]),
        "b_ba": _mean([r["scores"]["b"] for r in by_order["ba"]]),
        "a": _mean([r["scores"]["a"] for r in ok]),
        "b": _mean([r["scores"]["b"] for r in ok]),
        "flip_rate": _mean([float(verdict(v["ab"]) != verdict(v["ba"])) for v in both]),
        "position_bias": _mean([r["assistant_1"] - r["assistant_2"] for r in ok]),  # > 0: the first answer is favoured
    }
