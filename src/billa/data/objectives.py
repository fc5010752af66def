"""Objectives: one small pure function per record kind, record -> (input_ids, labels) (DESIGN.md §2).

Every sequence starts with BOS; loss-bearing segments end with EOS; label -100 means "no loss". A prefix (prompt) is
encoded on its own, exactly as it is encoded at inference time (``"Human: q\\nAssistant: "`` ends in a space piece),
and the target is encoded separately, so the tokens a model is prompted with at inference are the tokens it was
trained on. Random choices come from ``record_rng(seed, source, key)``: the same record gets the same cut,
direction and prompt on every run and after every resume.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

IGNORE = -100
Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class ObjectiveContext:
    """What every objective needs besides the record: the tokenizer's encode, special ids, limits and prompts."""

    encode: Encode  # text -> ids, no special tokens
    bos_id: int
    eos_id: int
    max_len: int
    prompts: dict[str, list[str]] = field(default_factory=dict)  # prompt-file stem -> lines
    translation_extra_newline: bool = False  # stage 2 appends one more "\n" after the translation prompt


def record_rng(seed: int, source: str, key: str | int) -> random.Random:
    """A RNG that depends only on (seed, source, record identity): stable across runs, workers and resumes."""
    digest = hashlib.blake2b(f"{seed}\x1f{source}\x1f{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def load_prompts(prompts_dir: str | Path) -> dict[str, list[str]]:
    """Every ``*.prompt`` file in ``prompts_dir``: file stem -> its non-empty lines (one prompt per line)."""
    prompts = {}
    for path in sorted(Path(prompts_dir).glob("*.prompt")):  # README.md there describes the naming
        lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
        prompts[path.stem] = [line for line in lines if line.strip()]
    return prompts


def _join(prefix: list[int], target: list[int], ctx: ObjectiveContext) -> Example | None:
    """BOS + prefix (no loss) + target + EOS (loss), truncated to max_len; None when no target token survives."""
    ids = [ctx.bos_id, *prefix, *target, ctx.eos_id][: ctx.max_len]
    n_prefix = 1 + len(prefix)
    labels = [IGNORE] * min(n_prefix, len(ids)) + ids[n_prefix:]
    example = Example(ids, labels)
    return example if example.num_targets else None


def causal_lm(record: dict, ctx: ObjectiveContext, rng: random.Random) -> Example | None:
    """Plain causal LM: BOS + text + EOS, loss on every token."""
    ids = [ctx.bos_id, *ctx.encode(record["text"]), ctx.eos_id][: ctx.max_len]
    return Example(ids, list(ids)) if len(ids) > 1 else None


def conditional_generation(record: dict, ctx: ObjectiveContext, rng: random.Random) -> Example | None:
    """BiLLa's stage-1 objective: cut at ``pos`` uniform in [int(0.2L)+1, int(0.7L)], loss only after the cut."""
    ids = [ctx.bos_id, *ctx.encode(record["text"]), ctx.eos_id][: ctx.max_len]
    length = len(ids)
    if length < 2:
        return None
    low = int(0.2 * length) + 1
    high = max(low, int(0.7 * length))
    pos = min(rng.randint(low, high), length - 1)  # keep at least one target token on very short texts
    return Example(ids, [IGNORE] * pos + ids[pos:])


def translation(record: dict, ctx: ObjectiveContext, rng: random.Random) -> Example | None:
    """Random direction and prompt; prefix = source + "\\n" + prompt (+ "\\n" in stage 2), no loss; target + EOS."""
    direction = rng.choice(("en2zh", "zh2en"))
    source, target = (record["en"], record["zh"]) if direction == "en2zh" else (record["zh"], record["en"])
    key = f"translation.{direction}"
    if not ctx.prompts.get(key):
        raise FileNotFoundError(f"no translation prompts: expected non-empty prompts file {key}.prompt")
    prompt = rng.choice(ctx.prompts[key])
    prefix = source + "\n" + prompt + ("\n" if ctx.translation_extra_newline else "")
    return _join(ctx.encode(prefix), ctx.encode(target), ctx)


def _task_placement(kind: str | None, ctx: ObjectiveContext, rng: random.Random) -> tuple[str | None, str]:
    """Where a task's prompt goes and which line: pre, post (a coin flip when both files exist) or none."""
    pre = ctx.prompts.get(f"{kind}.pre", []) if kind else []
    post = ctx.prompts.get(f"{kind}.post", []) if kind else []
    placement = rng.choice(("pre", "post")) if pre and post else ("pre" if pre else "post" if post else None)
    if placement is None:
        return None, ""
    return placement, rng.choice(pre if placement == "pre" else post)


def task(record: dict, ctx: ObjectiveContext, rng: random.Random) -> Example | None:
    """Stage-2 task record: pre prompt, post prompt (coin flip when both exist) or none; output.rstrip() + EOS."""
    placement, prompt = _task_placement(record.get("type"), ctx, rng)
    text = record["input"]
    if placement == "pre":
        prefix = prompt + "\n" + text.rstrip() + "\n\n"
    elif placement == "post":
        prefix = text.rstrip() + "\n" + prompt + "\n"
    else:
        prefix = text + " "
    return _join(ctx.encode(prefix), ctx.encode(record["output"].rstrip()), ctx)


HUMAN, ASSISTANT = "Human: ", "Assistant: "  # the trailing space after "Assistant:" is part of the template


def dialogue_prompt(question: str) -> str:
    """The inference prompt for one question: ``"Human: {q}\\nAssistant: "``."""
    return HUMAN + question + "\n" + ASSISTANT


def dialogue_turns(record: dict, ctx: ObjectiveContext, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs of a dialogue, instruction or task record, stripped as the SFT recipe does.

    - ``turns``: a multi-turn dialogue, every turn kept;
    - ``instruction`` + ``input``: the non-empty ones joined with "\\n" (BiLLa's math sets have ``instruction: ""``,
      which must not become ``"Human: \\n{input}"``);
    - a task record (``input``, ``output``, ``type``): the task prompt and the input become the Human turn (pre prompt
      + "\\n" + input, or input + "\\n" + post prompt, placement drawn as in stage 2), the output with its rationale
      the Assistant turn.
    """
    if "turns" in record:
        return [(t["human"].strip(), t["assistant"].strip()) for t in record["turns"]]
    if "instruction" in record:
        question = "\n".join(part for part in (record["instruction"].strip(), record.get("input", "").strip()) if part)
        return [(question, record["output"].strip())]
    placement, prompt = _task_placement(record.get("type"), ctx, rng)
    parts = {"pre": (prompt, record["input"].strip()), "post": (record["input"].strip(), prompt)}
    question = "\n".join(parts.get(placement, (record["input"].strip(),)))
    return [(question, record["output"].strip())]


def dialogue(record: dict, ctx: ObjectiveContext, rng: random.Random) -> Example | None:
    """Human/Assistant dialogue; loss on every Assistant answer (+ EOS), none on Human turns.

    ``record`` is a multi-turn dialogue (``turns``), an instruction record or a task record (``dialogue_turns``).
    BOS + ``"Human: {q1}\\nAssistant: "`` (no loss) + ``a1`` + EOS (loss), then ``"\\nHuman: {q2}\\nAssistant: "`` ...;
    the prefix and the answer are encoded separately, so the answer's tokens are those generated after the prompt.
    """
    ids, labels = [ctx.bos_id], [IGNORE]
    for i, (question, answer) in enumerate(dialogue_turns(record, ctx, rng)):
        if not answer:
            continue
        prefix = ctx.encode(("\n" if i else "") + dialogue_prompt(question))
        target = [*ctx.encode(answer), ctx.eos_id]
        ids += prefix + target
        labels += [IGNORE] * len(prefix) + target
    example = Example(ids[: ctx.max_len], labels[: ctx.max_len])
    return example if example.num_targets else None


OBJECTIVES: dict[str, Callable[[dict, ObjectiveContext, random.Random], Example | None]] = {
    "causal_lm": causal_lm,
    "conditional_generation": conditional_generation,
    "translation": translation,
    "task": task,
    "dialogue": dialogue,
}
