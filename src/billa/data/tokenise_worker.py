"""Worker side of the tokenisation pass: objectives applied to chunks of records with one batched encode.

A module of its own with light imports (no ``datasets``, no Lightning), because ``num_proc`` workers are spawned
and import it afresh: their start-up is part of the pass's time.
"""

from __future__ import annotations

from dataclasses import dataclass

from billa.data.objectives import OBJECTIVES, ObjectiveContext, load_prompts, record_rng


@dataclass(frozen=True)
class ObjectiveSettings:
    """Everything besides the input file that determines the tokens of a shard."""

    source: str
    fmt: str
    objective: str
    max_len: int
    seed: int
    translation_extra_newline: bool
    reader_options: tuple = ()
    on_error: str = "raise"


_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, prompts_dir: str) -> None:
    from billa.tokenizer.load import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    _WORKER["tokenizer"] = tokenizer
    _WORKER["prompts"] = load_prompts(prompts_dir)


_CHUNK = 2000  # records tokenised together (one batched encode, one Arrow record batch)


def _schema():
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("line", pa.int64())])


def _encode_chunk(records: list, settings: ObjectiveSettings, ctx: ObjectiveContext, tokenizer) -> tuple[list, int]:
    """Apply the objective to a chunk of records with one batched encode.

    Objectives are pure functions whose strings to encode depend only on the record and its RNG, so a first pass
    records those strings, one batched call encodes them, and a second pass builds the examples from the lookup.
    """
    objective = OBJECTIVES[settings.objective]
    wanted: dict[str, None] = {}

    def record_text(text: str) -> list[int]:
        wanted[text] = None
        return []

    ctx.encode = record_text
    for record in records:
        objective(record.fields, ctx, record_rng(settings.seed, settings.source, record.where))
    texts = list(wanted)
    encoded = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True)) if texts else {}
    ctx.encode = encoded.__getitem__
    examples, dropped = [], 0
    for record in records:
        example = objective(record.fields, ctx, record_rng(settings.seed, settings.source, record.where))
        if example is None:
            dropped += 1
        else:
            examples.append((example, record.line))
    return examples, dropped


def _encode_records(records: list, settings: ObjectiveSettings) -> tuple[list, int]:
    """Worker task: one chunk of records -> rows ``(input_ids, labels, line)`` and the count of dropped records."""
    tokenizer = _WORKER["tokenizer"]
    ctx = ObjectiveContext(
        encode=None,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        max_len=settings.max_len,
        prompts=_WORKER["prompts"],
        translation_extra_newline=settings.translation_extra_newline,
    )
    examples, dropped = _encode_chunk(records, settings, ctx, tokenizer)
    return [(e.input_ids, e.labels, line) for e, line in examples], dropped
