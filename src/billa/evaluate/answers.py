"""Answers: a question file -> an answer file in the FastChat / BiLLa format, through the dialogue template.

Questions: jsonl ``{"question_id", "text", "category"}``. Answers: jsonl ``{"question_id", "text", "answer_id",
"model_id", "metadata"}``, one line per question, in question order. The prompt is ``"Human: {q}\\nAssistant: "``
(``billa.templates.dialogue_prompt``, what stage 3 trains on). Questions are answered in fixed chunks of the
question list, each sampled with its own seed and appended in one write: a rerun skips finished chunks and gives
the same file an uninterrupted run gives.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from billa.data.readers import DataFormatError, raw_records
from billa.evaluate.lm import EvalLM
from billa.evaluate.multiple_choice import resolve_path
from billa.evaluate.results import Table, TaskResult
from billa.templates import HUMAN, dialogue_prompt
from billa.utils.logging import get_logger

log = get_logger(__name__)


def records_by_question_id(path: str, shape: str, what: str) -> dict:
    """question_id -> record of a question or answer jsonl (FastChat format), in file order.

    Every record needs a ``question_id`` and a string ``text``; a bad line or a repeated ``question_id`` is an error
    naming file:line, ``shape`` (the expected fields) and ``what`` (the config key).
    """
    records: dict = {}
    for line, raw in raw_records(path):
        where = f"{path}:{line}"
        if isinstance(raw, DataFormatError):
            raise raw
        if not isinstance(raw, dict) or "question_id" not in raw or not isinstance(raw.get("text"), str):
            raise DataFormatError(f"{where}: expected {shape} ({what}), got {str(raw)[:100]!r}")
        if raw["question_id"] in records:
            raise DataFormatError(f"{where}: question_id {raw['question_id']!r} appears twice ({what})")
        records[raw["question_id"]] = raw
    return records


def load_questions(path: str, what: str = "answers.question_file") -> list[dict]:
    """Questions ``{"question_id", "text", "category"}`` in file order; a bad line is an error naming file:line."""
    path = resolve_path(path)
    if not Path(path).is_file() and not path.startswith("hf://"):
        raise FileNotFoundError(f"{what}={path}: no such file")
    records = records_by_question_id(path, "{question_id, text, category}", what)
    questions = [{"question_id": q, "text": r["text"], "category": r.get("category", "")} for q, r in records.items()]
    if not questions:
        raise DataFormatError(f"{what}={path}: no questions")
    return questions


def answer_id(model_id: str, question_id: object, seed: int) -> str:
    """A stable 22-character id (FastChat uses a random shortuuid of that length)."""
    return hashlib.blake2b(f"{model_id}\x1f{question_id}\x1f{seed}".encode(), digest_size=11).hexdigest()


def read_answers(path: Path) -> list[dict]:
    """The complete answer lines already in ``path``; a truncated last line (a crash mid-write) is dropped."""
    if not path.is_file():
        return []
    done = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise DataFormatError(f"{path}:{number}: not valid JSON; move the file away to start over") from None
            log.warning("%s:%d: incomplete last line (interrupted write) dropped; its chunk is redone", path, number)
    return done


def _resume(path: Path, chunks: list[list[dict]]) -> set:
    """Keep the answers of complete chunks (rewriting the file without the rest); return their question ids.

    A chunk is written in one call, so only the last one can be partial (an interrupted write); it is redone
    whole, with its own seed, so the result equals an uninterrupted run.
    """
    done = read_answers(path)
    answered = {r.get("question_id") for r in done}
    chunk_of = {q["question_id"]: i for i, chunk in enumerate(chunks) for q in chunk}
    complete = {i for i, chunk in enumerate(chunks) if all(q["question_id"] in answered for q in chunk)}
    keep = [
        r for r in done if chunk_of.get(r.get("question_id"), -1) in complete or r.get("question_id") not in chunk_of
    ]
    if done:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
        log.info("%s: %d answers already there, resuming", path, len(keep))
    return {r.get("question_id") for r in keep}


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))  # one write per chunk
        handle.flush()
        os.fsync(handle.fileno())


def answers(
    lm: EvalLM,
    question_file: str,
    output_dir: str,
    answer_file: str | None = None,
    model_id: str | None = None,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    do_sample: bool = True,
    chunk_size: int | None = None,
    seed: int = 42,
) -> TaskResult:
    """Answer every question not yet in the answer file; returns counts per category.

    Args:
        lm: the model.
        question_file: jsonl questions (a path or ``fixtures://questions.jsonl``).
        output_dir: where ``answers.jsonl`` goes unless ``answer_file`` is set.
        answer_file: the answer jsonl (appended to; rerun to resume).
        model_id: written into every answer (default: the model directory).
        temperature, top_p, do_sample: sampling (BiLLa: temperature 0.7); ``do_sample=false`` is greedy.
        max_new_tokens: BiLLa: 1,024; capped to what the model's context leaves after the prompt.
        chunk_size: questions per chunk (one seed, one write); default ``lm.batch_size``.
        seed: sampling seed.
    """
    questions = load_questions(question_file)
    path = Path(answer_file or Path(output_dir) / "answers.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    model_id = model_id or lm.name
    chunk_size = chunk_size or lm.batch_size
    prompts = {q["question_id"]: dialogue_prompt(q["text"]) for q in questions}
    longest = max(len(lm.encode(p)) for p in prompts.values())
    budget = min(max_new_tokens, lm.max_length - longest)
    if budget < max_new_tokens:
        log.warning(
            "answers.max_new_tokens=%d does not fit the model's %d positions after a %d-token prompt: using %d",
            max_new_tokens,
            lm.max_length,
            longest,
            budget,
        )
    metadata = {
        "temperature": temperature if do_sample else 0.0,
        "top_p": top_p,
        "max_new_tokens": budget,
        "prompt_template": HUMAN + "{q}\nAssistant: ",
        "seed": seed,
    }
    chunks = [questions[i : i + chunk_size] for i in range(0, len(questions), chunk_size)]
    finished = _resume(path, chunks)
    progress = tqdm(total=len(questions), initial=len(finished), desc="answers", unit="question")
    for index, chunk in enumerate(chunks):
        todo = [q for q in chunk if q["question_id"] not in finished]
        if not todo:
            continue
        texts = lm.generate(
            [prompts[q["question_id"]] for q in todo], budget, do_sample, temperature, top_p, seed=seed + index
        )
        _append(
            path,
            [
                {
                    "question_id": q["question_id"],
                    "text": text.strip(),
                    "answer_id": answer_id(model_id, q["question_id"], seed),
                    "model_id": model_id,
                    "metadata": metadata,
                }
                for q, text in zip(todo, texts, strict=True)
            ],
        )
        progress.update(len(todo))
    progress.close()
    by_category: dict[str, int] = {}
    for q in questions:
        by_category[category_name(q["category"])] = by_category.get(category_name(q["category"]), 0) + 1
    rows = [[c, n] for c, n in sorted(by_category.items())]
    return TaskResult(
        metrics={"questions": len(questions), "answered_before": len(finished)},
        tables={"questions": Table(["category", "questions"], rows)},
        details={"answer_file": str(path), "model_id": model_id, "metadata": metadata},
        files=[str(path)],
    )


def category_name(category: str) -> str:
    """Categories compare after Unicode normalisation: ``"closed\\xa0qa"`` (as files spell it) is ``"closed qa"``."""
    import unicodedata

    return " ".join(unicodedata.normalize("NFKC", category or "").split()) or "uncategorised"
