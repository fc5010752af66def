"""Multiple choice: LogiQA 2.0 and C3 as distributed, scored two ways.

- ``generative``: a zero-shot Chinese instruction with lettered options (through the dialogue template by default),
  greedy decoding up to 64 new tokens, and the first standalone letter A-D of the output is the answer (BiLLa's
  protocol behind LogiQA-v2 32.74, C3-d 56.08, C3-m 64.69).
- ``loglik``: sum of log P(" " + option | prompt) per option, scored as lm-evaluation-harness does
  (``EvalLM.loglikelihood``): ``acc`` takes the highest sum, ``acc_norm`` the highest sum per character of the option.

Loaders read the files users download: LogiQA 2.0 JSON Lines (``.txt``; en with ``id`` and ``type``, zh with
``example_id`` and options prefixed "A." ...) and C3's ``c3-{d,m}-{dev,test}.json`` (a JSON array of
``[[paragraphs], [{question, choice, answer}], id]``), or ``hf://`` datasets with the same fields.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from billa.data.readers import DataFormatError, expand_paths, raw_records
from billa.evaluate.lm import EvalLM
from billa.evaluate.results import Table, TaskResult, item_table
from billa.templates import dialogue_prompt
from billa.utils.logging import get_logger

log = get_logger(__name__)

LETTERS = "ABCD"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_SCHEME = "fixtures://"  # a file shipped in billa/evaluate/fixtures (the embedded default's items)
_PREFIX = re.compile(r"^\s*([A-Da-d])\s*[.．、:：)）]\s*")
_LETTER = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")


@dataclass(frozen=True)
class MCItem:
    """One question: ``options[answer]`` is right. ``where`` is file:line (or file:element.question)."""

    id: str
    passage: str
    question: str
    options: tuple[str, ...]
    answer: int
    where: str


def resolve_path(path: str) -> str:
    """``fixtures://name`` -> the shipped fixture file; anything else unchanged."""
    return str(FIXTURES / path[len(FIXTURE_SCHEME) :]) if str(path).startswith(FIXTURE_SCHEME) else str(path)


def strip_letter_prefixes(options: list[str]) -> list[str]:
    """Drop "A." / "B、" / "C)" prefixes when the options carry A, B, C, D in order (LogiQA 2.0 zh does)."""
    matches = [_PREFIX.match(o) for o in options]
    if all(matches) and [m.group(1).upper() for m in matches] == list(LETTERS[: len(options)]):
        return [o[m.end() :] for o, m in zip(options, matches, strict=True)]
    return options


def _check_options(options: object, where: str) -> list[str]:
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DataFormatError(f"{where}: options must be a list of strings, got {options!r}")
    if not 2 <= len(options) <= len(LETTERS):
        raise DataFormatError(f"{where}: {len(options)} options; expected 2 to {len(LETTERS)} (letters A-D)")
    return options


def _logiqa2(raw: object, where: str) -> Iterator[MCItem]:
    """A LogiQA 2.0 line: en ``{id, answer, text, question, options, type}``, zh ``{example_id, ...}``, "A." options."""
    if not isinstance(raw, dict):
        raise DataFormatError(f"{where}: expected a JSON object (LogiQA 2.0 line), got {type(raw).__name__}")
    missing = [k for k in ("answer", "text", "question", "options") if k not in raw]
    item_id = raw.get("id", raw.get("example_id"))
    if missing or item_id is None:
        raise DataFormatError(
            f"{where}: LogiQA 2.0 record lacks {missing + ([] if item_id is not None else ['id/example_id'])}; "
            f"has {sorted(raw)}"
        )
    options = strip_letter_prefixes(_check_options(raw["options"], where))
    answer = raw["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
        raise DataFormatError(f"{where}: answer={answer!r}; expected an option index 0-{len(options) - 1}")
    yield MCItem(str(item_id), raw["text"], raw["question"], tuple(options), answer, where)


def _c3_questions(raw: object, where: str) -> tuple[list[str], list[dict], str]:
    if isinstance(raw, list) and len(raw) == 3:  # the distributed JSON: [[paragraphs], [questions], id]
        return raw[0], raw[1], str(raw[2])
    if isinstance(raw, dict) and "documents" in raw:  # hub rows: {documents, questions: {question, choice, answer}}
        qs = raw["questions"]
        if isinstance(qs, dict):
            qs = [dict(zip(qs, values, strict=True)) for values in zip(*qs.values(), strict=True)]
        return raw["documents"], qs, str(raw.get("document_id", raw.get("id", where)))
    raise DataFormatError(f"{where}: expected a C3 element [[paragraphs], [questions], id], got {str(raw)[:80]!r}")


def _c3(raw: object, where: str) -> Iterator[MCItem]:
    """A C3 element: every question of one document (2-4 choices; the answer is the choice's text)."""
    paragraphs, questions, doc_id = _c3_questions(raw, where)
    for k, q in enumerate(questions, start=1):
        at = f"{where}.q{k}"
        if not isinstance(q, dict) or not {"question", "choice", "answer"} <= set(q):
            raise DataFormatError(f"{at}: C3 question needs question, choice, answer; got {q!r}")
        options = _check_options(q["choice"], at)
        if q["answer"] not in options:
            raise DataFormatError(f"{at}: answer {q['answer']!r} is not one of the choices {options}")
        yield MCItem(
            f"{doc_id}-{k}", "\n".join(paragraphs), q["question"], tuple(options), options.index(q["answer"]), at
        )


LOADERS: dict[str, Callable[[object, str], Iterator[MCItem]]] = {"logiqa2": _logiqa2, "c3": _c3}


def load_items(path: str, dataset: str, what: str, max_items: int | None = None) -> list[MCItem]:
    """Every item of the file(s) ``path`` in ``dataset``'s format (a key of ``LOADERS``)."""
    if dataset not in LOADERS:
        raise ValueError(f"{what}: unknown dataset {dataset!r}; known: {sorted(LOADERS)}")
    items: list[MCItem] = []
    for file in expand_paths(resolve_path(path), what):
        for line, raw in raw_records(file):
            if isinstance(raw, DataFormatError):
                raise raw
            items.extend(LOADERS[dataset](raw, f"{file}:{line}"))
            if max_items is not None and len(items) >= max_items:
                return items[:max_items]
    if not items:
        raise DataFormatError(f"{what}: no items in {path}")
    return items


def lettered(options: tuple[str, ...]) -> str:
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


def render(template: str, item: MCItem) -> str:
    return template.format(passage=item.passage, question=item.question, options=lettered(item.options))


def extract_letter(output: str, n_options: int) -> int | None:
    """The first standalone letter A-D of a generated answer (full-width letters count), as an option index.

    "答案是B。", "(C) because", "Answer: D" and "Ｂ" give B, C, D, B ("A" inside "Answer" is part of a word); a
    letter beyond the item's options, or no letter, gives None (scored wrong, counted as unparsed).
    """
    match = _LETTER.search(unicodedata.normalize("NFKC", output))
    if match is None:
        return None
    index = LETTERS.index(match.group(1))
    return index if index < n_options else None


def generative(lm: EvalLM, items: list[MCItem], instruction: str, template: str, max_new_tokens: int, desc: str):
    """BiLLa's protocol: greedy answers to the lettered instruction; returns per-item (output, predicted index)."""
    prompts = [render(instruction, item) for item in items]
    if template == "dialogue":
        prompts = [dialogue_prompt(p) for p in prompts]
    elif template != "plain":
        raise ValueError(f"generative.template={template!r}: expected dialogue (Human/Assistant) or plain")
    outputs = lm.generate(prompts, max_new_tokens=max_new_tokens, desc=desc)
    return [(out, extract_letter(out, len(item.options))) for out, item in zip(outputs, items, strict=True)]


def loglik(lm: EvalLM, items: list[MCItem], prompt: str, delimiter: str, desc: str):
    """lm-evaluation-harness's multiple choice: per item (log-likelihoods, pred by acc, pred by acc_norm)."""
    requests = [(render(prompt, item), delimiter + option) for item in items for option in item.options]
    scores = iter(lm.loglikelihood(requests, desc=desc))
    out = []
    for item in items:
        lls = np.array([next(scores)[0] for _ in item.options])
        lengths = np.array([float(len(option)) for option in item.options])  # characters, without the delimiter
        out.append((lls.tolist(), int(np.argmax(lls)), int(np.argmax(lls / lengths))))
    return out


def _pick(value: str | Mapping[str, str], subset: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if subset not in value:
        raise KeyError(f"{key} has no entry for subset {subset!r} (entries: {sorted(value)})")
    return value[subset]


# The per-item W&B table: the item, the gold answer and each protocol's prediction (and the generated text)
ITEM_COLUMNS = ("subset", "id", "where", "answer", "generative_pred", "generated", "loglik_pred", "loglik_pred_norm")


def multiple_choice(
    lm: EvalLM,
    dataset: str,
    files: Mapping[str, str],
    protocols: list[str] = ("generative", "loglik"),
    generative_settings: Mapping | None = None,
    loglik_settings: Mapping | None = None,
    max_items: int | None = None,
    task: str = "mc",
) -> TaskResult:
    """Evaluate every subset file with every protocol.

    Args:
        lm: the model.
        dataset: ``logiqa2`` or ``c3`` (the file format).
        files: subset name -> file, glob, ``hf://`` dataset or ``fixtures://`` file.
        protocols: ``generative`` and/or ``loglik``.
        generative_settings: ``instruction`` (with ``{passage}``, ``{question}``, ``{options}``; or a mapping subset ->
            instruction), ``template`` (``dialogue`` | ``plain``), ``max_new_tokens``.
        loglik_settings: ``prompt`` (same placeholders, or a mapping subset -> prompt) and ``delimiter`` (" ").
        max_items: per subset (null = all).
        task: the task's name in messages.
    """
    unknown = set(protocols) - {"generative", "loglik"}
    if unknown:
        raise ValueError(f"{task}.protocols: unknown {sorted(unknown)}; expected generative and/or loglik")
    gen, ll = dict(generative_settings or {}), dict(loglik_settings or {})
    metrics, rows, details = {}, [], []
    for subset, path in files.items():
        items = load_items(path, dataset, f"{task}.files.{subset}", max_items)
        per_item = [{"id": it.id, "where": it.where, "answer": LETTERS[it.answer]} for it in items]
        metrics[f"{subset}/items"] = len(items)  # how finely its accuracy resolves (billa.compare flags small sets)
        if "generative" in protocols:
            instruction = _pick(gen["instruction"], subset, f"{task}.generative_settings.instruction")
            answers = generative(
                lm,
                items,
                instruction,
                gen.get("template", "dialogue"),
                gen.get("max_new_tokens", 64),
                f"{task} {subset} generative",
            )
            correct = [pred == it.answer for (_, pred), it in zip(answers, items, strict=True)]
            unparsed = sum(pred is None for _, pred in answers)
            metrics[f"{subset}/generative/acc"] = float(np.mean(correct))
            metrics[f"{subset}/generative/unparsed"] = unparsed / len(items)
            rows.append([subset, "generative", "acc", len(items), float(np.mean(correct)), unparsed])
            for record, (out, pred) in zip(per_item, answers, strict=True):
                record.update(generated=out, generative_pred=LETTERS[pred] if pred is not None else None)
        if "loglik" in protocols:
            prompt = _pick(ll["prompt"], subset, f"{task}.loglik_settings.prompt")
            scored = loglik(lm, items, prompt, ll.get("delimiter", " "), f"{task} {subset} loglik")
            acc = float(np.mean([p == it.answer for (_, p, _), it in zip(scored, items, strict=True)]))
            acc_norm = float(np.mean([p == it.answer for (_, _, p), it in zip(scored, items, strict=True)]))
            metrics[f"{subset}/loglik/acc"], metrics[f"{subset}/loglik/acc_norm"] = acc, acc_norm
            rows += [
                [subset, "loglik", "acc", len(items), acc, None],
                [subset, "loglik", "acc_norm", len(items), acc_norm, None],
            ]
            for record, (lls, pred, pred_norm) in zip(per_item, scored, strict=True):
                record.update(loglik=lls, loglik_pred=LETTERS[pred], loglik_pred_norm=LETTERS[pred_norm])
        details.extend({"subset": subset, **r} for r in per_item)
    table = Table(["subset", "protocol", "metric", "items", "value", "unparsed"], rows)
    return TaskResult(
        metrics=metrics,
        tables={"accuracy": table},
        item_tables={"items": item_table(details, [c for c in ITEM_COLUMNS if any(c in d for d in details)])},
        details={"items": details},
    )
