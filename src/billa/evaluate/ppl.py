"""Perplexity and bits per character on jsonl/JSON corpora, per source and per language.

Two objectives, both the training code's own (``billa.data.objectives``):

- ``conditional_generation`` (BiLLa's protocol): each document is cut at a seeded position in
  [int(0.2L)+1, int(0.7L)] (``record_rng(seed, source, file:line)``: the same cut for a document on every run) and only
  the tokens after the cut are scored;
- ``causal_lm``: every token after BOS is scored (plain perplexity).

Perplexity is exp(total NLL / scored tokens) over a source (EOS included, as in training). It depends on the
vocabulary; bits per character = total NLL / ln 2 / characters of the scored text does not, so it compares a
model before and after vocabulary expansion.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from billa.data.objectives import IGNORE, OBJECTIVES, ObjectiveContext, record_rng
from billa.data.readers import read_records
from billa.evaluate.lm import EvalLM
from billa.evaluate.results import Table, TaskResult
from billa.utils.logging import get_logger

log = get_logger(__name__)

TEXT_OBJECTIVES = ("conditional_generation", "causal_lm")


@dataclass
class Scored:
    """Totals over a set of documents."""

    docs: int = 0
    tokens: int = 0
    chars: int = 0
    nll: float = 0.0  # nats

    def add(self, other: Scored) -> None:
        self.docs, self.tokens = self.docs + other.docs, self.tokens + other.tokens
        self.chars, self.nll = self.chars + other.chars, self.nll + other.nll

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_char(self) -> float:
        return self.nll / math.log(2) / self.chars if self.chars else float("nan")

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars if self.chars else float("nan")


def scored_chars(offsets: list[tuple[int, int]], labels: list[int]) -> int:
    """Characters of the text covered by the scored tokens of ``BOS + text tokens (+ EOS)``.

    Position j >= 1 of the sequence is text token j - 1; position 0 (BOS) is never scored.
    """
    scored = [j - 1 for j in range(1, len(labels)) if labels[j] != IGNORE and j - 1 < len(offsets)]
    if not scored:
        return 0
    return offsets[scored[-1]][1] - offsets[scored[0]][0]


def _examples(lm: EvalLM, texts: list[tuple[str, str]], objective: str, source: str, seed: int, max_len: int):
    """(input_ids, labels, characters scored) per text, built by the training objective."""
    tokenizer = lm.tokenizer
    out = []
    for where, text in texts:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ctx = ObjectiveContext(
            encode=lambda _t, ids=encoding["input_ids"]: list(ids),  # the record's only text
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            max_len=max_len,
        )
        example = OBJECTIVES[objective]({"text": text}, ctx, record_rng(seed, source, where))
        if example is not None:
            out.append((example.input_ids, example.labels, scored_chars(encoding["offset_mapping"], example.labels)))
    return out


def perplexity(
    lm: EvalLM,
    sources: Mapping[str, Mapping],
    objectives: list[str] = TEXT_OBJECTIVES,
    max_records: int | None = 1000,
    max_seq_length: int = 1024,
    seed: int = 42,
    build: Callable[[], object] | None = None,
) -> TaskResult:
    """Score every source with every objective; report per source, per language and over all sources.

    Args:
        lm: the model.
        sources: name -> ``{path, format, lang}``: a file, glob, directory or ``hf://`` dataset in a text format of
            ``billa.data.readers`` (``wudao``, ``pile``); ``lang`` groups sources (default: the name).
        objectives: ``conditional_generation`` and/or ``causal_lm``.
        max_records: documents per source (BiLLa: 1,000); null = all.
        max_seq_length: documents are truncated to this many tokens (BOS and EOS included).
        seed: the cut-point seed (training's ``seed``: the same cuts as its validation).
        build: called first (creates the sample corpus when it is missing).
    """
    for objective in objectives:
        if objective not in TEXT_OBJECTIVES:
            raise ValueError(f"ppl.objectives: {objective!r} is not one of {list(TEXT_OBJECTIVES)}")
    if build is not None:
        build()
    max_len = min(max_seq_length, lm.max_length)
    totals: dict[tuple[str, str], Scored] = {}
    langs: dict[str, str] = {}
    for name, spec in sources.items():
        langs[name] = spec.get("lang") or name
        records = read_records(spec["path"], spec["format"], f"ppl.sources.{name}.path")
        texts = [(r.where, r.fields["text"]) for r in itertools.islice(records, max_records)]
        for objective in objectives:
            examples = _examples(lm, texts, objective, name, seed, max_len)
            nll = lm.token_nll([(ids, labels) for ids, labels, _ in examples], desc=f"ppl {name} {objective}")
            totals[(name, objective)] = Scored(
                len(examples), sum(len(n) for n in nll), sum(c for *_, c in examples), float(sum(n.sum() for n in nll))
            )
    return _result(totals, langs, objectives)


def _result(totals: dict[tuple[str, str], Scored], langs: dict[str, str], objectives: list[str]) -> TaskResult:
    groups: dict[tuple[str, str], Scored] = {}
    members = {lang: {n for n, lng in langs.items() if lng == lang} for lang in langs.values()}
    for (name, objective), scored in totals.items():
        lang = langs[name]
        keys = [(name, objective), ("all", objective)]
        if members[lang] != {lang}:  # a language row only where it is not just the source of that name
            keys.insert(1, (f"lang:{lang}", objective))
        for key in keys:
            groups.setdefault(key, Scored()).add(scored)
    columns = ["group", "objective", "docs", "tokens", "chars", "ppl", "bits_per_char", "tokens_per_char"]
    rows, metrics = [], {}
    for (group, objective), s in groups.items():
        rows.append([group, objective, s.docs, s.tokens, s.chars, s.ppl, s.bits_per_char, s.tokens_per_char])
        key = group.removeprefix("lang:") if group.startswith("lang:") else group
        prefix = f"{'lang/' if group.startswith('lang:') else ''}{key}/{objective}"
        metrics[f"{prefix}/ppl"] = s.ppl
        metrics[f"{prefix}/bits_per_char"] = s.bits_per_char
    rows.sort(key=lambda r: (objectives.index(r[1]), r[0] == "all", r[0].startswith("lang:"), r[0]))
    return TaskResult(metrics=metrics, tables={"perplexity": Table(columns, rows)})
