"""Objectives: one small pure function per record kind, record -> (input_ids, labels) (docs/recipe.md, "Objectives").

Every sequence starts with BOS; loss-bearing segments end with EOS; label -100 means "no loss". A prefix (prompt) is
encoded on its own, exactly as it is encoded at inference time (``"Human: q\\nAssistant: "`` ends in a space piece),
and the target is encoded separately, so the tokens a model is prompted with at inference are the tokens it was
trained on.

BiLLa draws its random choices (the conditional-generation cut, translation direction and prompt, a task prompt's
placement and line) afresh on every visit of a record. ``variants(name, record, ctx)`` therefore enumerates every
choice a record can get, each tokenised once with its probability (``Variants``); ``Variants.draw`` picks one per
visit with ``record_rng(seed, source, key, visit)``, so runs and resumes stay exact. The single-draw functions
(``translation(record, ctx, rng)`` ...) draw with the same probabilities and serve evaluation and tests.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from billa.language import detect_lang
from billa.templates import dialogue_prompt
from billa.utils.errors import MissingInputError

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
    translation_extra_newline: bool = False  # stage 2: source.rstrip() + "\n" + prompt + "\n" (BiLLa's stage-2 code)
    prompt_types: dict[str, str] = field(default_factory=dict)  # record `type` -> prompt-file stem (data.prompt_types)
    prompt_language: str = "match"  # task prompt lines: match = those in the record's language; any = every line


def record_rng(seed: int, source: str, key: str | int, visit: int | None = None) -> random.Random:
    """A RNG that depends only on (seed, source, record identity, visit): stable across runs, workers and resumes."""
    text = f"{seed}\x1f{source}\x1f{key}" + ("" if visit is None else f"\x1f{visit}")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line, each stripped as BiLLa's code does; blank lines are skipped (BiLLa would keep them as
    empty prompts)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def load_prompts(prompts_dir: str | Path, translation_prompts: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Every ``*.prompt`` file in ``prompts_dir`` (file stem -> its lines), plus the translation prompt files.

    Args:
        prompts_dir: ``data.prompts_dir``: ``<stem>.prompt`` files; task prompts are ``<type>.pre.prompt`` and
            ``<type>.post.prompt`` (BiLLa's ``prompts/`` layout), translation ``translation.{en2zh,zh2en}.prompt``.
        translation_prompts: ``data.translation_prompts``: direction (``en2zh``, ``zh2en``) -> prompt file, for
            prompt sets that keep them elsewhere (BiLLa: ``translate/en-zh.prompt``, ``translate/zh-en.prompt``).
    """
    if not Path(prompts_dir).is_dir():
        raise FileNotFoundError(f"data.prompts_dir={prompts_dir}: not a directory of *.prompt files")
    prompts = {path.stem: read_prompt_file(path) for path in sorted(Path(prompts_dir).glob("*.prompt"))}
    for direction, path in (translation_prompts or {}).items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.translation_prompts.{direction}={path}: no such prompt file")
        prompts[f"translation.{direction}"] = read_prompt_file(path)
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


def cut_point(length: int, rng: random.Random) -> int:
    """BiLLa's cut: uniform in [int(0.2L)+1, int(0.7L)], kept below L so that at least one target token remains."""
    low = int(0.2 * length) + 1
    high = max(low, int(0.7 * length))
    return min(rng.randint(low, high), length - 1)


def conditional_generation(record: dict, ctx: ObjectiveContext, rng: random.Random) -> Example | None:
    """BiLLa's stage-1 objective: cut at ``pos`` uniform in [int(0.2L)+1, int(0.7L)], loss only after the cut."""
    ids = [ctx.bos_id, *ctx.encode(record["text"]), ctx.eos_id][: ctx.max_len]
    if len(ids) < 2:
        return None
    pos = cut_point(len(ids), rng)
    return Example(ids, [IGNORE] * pos + ids[pos:])


TRANSLATION_DIRECTIONS = ("en2zh", "zh2en")


def translation_choices(ctx: ObjectiveContext) -> list[tuple[float, str, str]]:
    """(probability, direction, prompt) of every translation draw: a fair direction, then a uniform prompt line."""
    choices = []
    for direction in TRANSLATION_DIRECTIONS:
        lines = ctx.prompts.get(f"translation.{direction}")
        if not lines:
            raise MissingInputError(
                f"no translation prompts for {direction}: expected a non-empty prompt file (data.translation_prompts)"
            )
        choices += [(0.5 / len(lines), direction, line) for line in lines]
    return choices


def translation_example(record: dict, ctx: ObjectiveContext, direction: str, prompt: str) -> Example | None:
    """Prefix = source + "\n" + prompt (stage 2: source.rstrip() + "\n" + prompt + "\n"), no loss; target + EOS."""
    source, target = (record["en"], record["zh"]) if direction == "en2zh" else (record["zh"], record["en"])
    if ctx.translation_extra_newline:  # BiLLa's stage-2 code right-strips the source before the prompt
        prefix = source.rstrip() + "\n" + prompt + "\n"
    else:
        prefix = source + "\n" + prompt
    return _join(ctx.encode(prefix), ctx.encode(target), ctx)


def translation(record: dict, ctx: ObjectiveContext, rng: random.Random) -> Example | None:
    """One draw of the translation objective (direction and prompt line at random)."""
    _, direction, prompt = _pick(translation_choices(ctx), rng)
    return translation_example(record, ctx, direction, prompt)


def prompt_stem(kind: str | None, ctx: ObjectiveContext) -> str | None:
    """The prompt-file stem of a task ``type``: its own files when the prompt set has them, else ``prompt_types``."""
    if not kind:
        return None
    if f"{kind}.pre" in ctx.prompts or f"{kind}.post" in ctx.prompts:
        return kind
    return ctx.prompt_types.get(kind, kind)


def unmapped_type(kind: str | None, ctx: ObjectiveContext) -> bool:
    """A non-empty task ``type`` with no prompt file: neither its own ``<type>.{pre,post}.prompt`` nor a stem in
    ``data.prompt_types`` that has one. Its records get no prompt (BiLLa's rule); tokenisation counts and reports them.
    """
    stem = prompt_stem(kind, ctx)
    return bool(kind) and not (ctx.prompts.get(f"{stem}.pre") or ctx.prompts.get(f"{stem}.post"))


def prompt_lines(lines: list[str], text: str | None, ctx: ObjectiveContext) -> list[str]:
    """The lines of a task prompt file a record of ``text`` draws from: with ``prompt_language=match`` those in the
    record's language (``billa.language.detect_lang``), all of them when the file has none in it (or no text)."""
    if ctx.prompt_language != "match" or text is None:
        return lines
    lang = detect_lang(text)
    return [line for line in lines if detect_lang(line) == lang] or lines


def task_choices(
    kind: str | None, ctx: ObjectiveContext, text: str | None = None
) -> list[tuple[float, str | None, str]]:
    """(probability, placement, prompt) of every task draw, as BiLLa's stage-2 code draws them.

    BiLLa flips a fair coin between "post" and "pre"; when ``<type>.<placement>.prompt`` does not exist (or the type
    is empty) the sample gets no prompt, else one line of that file at random. So with both files each placement
    has probability 1/2, with one file that prompt and no prompt have 1/2 each, with none the prompt is always absent.
    The line is drawn from those in the language of ``text`` (the record's input; ``prompt_lines``).
    """
    stem = prompt_stem(kind, ctx)
    choices: list[tuple[float, str | None, str]] = []
    none = 0.0
    for placement in ("post", "pre"):
        lines = ctx.prompts.get(f"{stem}.{placement}") if stem else None
        lines = prompt_lines(lines, text, ctx) if lines else None
        if lines:
            choices += [(0.5 / len(lines), placement, line) for line in lines]
        else:
            none += 0.5
    if none:
        choices.append((none, None, ""))
    return choices


def _pick(choices: list, rng: random.Random):
    return rng.choices(choices, weights=[c[0] for c in choices])[0]


def task_example(record: dict, ctx: ObjectiveContext, placement: str | None, prompt: str) -> Example | None:
    """pre: prompt + "\n" + input.rstrip() + "\n\n"; post: input.rstrip() + "\n" + prompt + "\n"; none: input + " ".

    The prefix carries no loss; the target is output.rstrip() + EOS.
    """
    text = record["input"]
    if placement == "pre":
        prefix = prompt + "\n" + text.rstrip() + "\n\n"
    elif placement == "post":
        prefix = text.rstrip() + "\n" + prompt + "\n"
    else:
        prefix = text + " "
    return _join(ctx.encode(prefix), ctx.encode(record["output"].rstrip()), ctx)


def task(record: dict, ctx: ObjectiveContext, rng: random.Random) -> Example | None:
    """One draw of the stage-2 task objective (placement and prompt line as ``task_choices``)."""
    _, placement, prompt = _pick(task_choices(record.get("type"), ctx, record["input"]), rng)
    return task_example(record, ctx, placement, prompt)


def dialogue_turns(
    record: dict, ctx: ObjectiveContext, rng: random.Random | None = None, choice: tuple | None = None
) -> list[tuple[str, str]]:
    """(question, answer) pairs of a dialogue, instruction or task record, stripped as the SFT recipe does.

    - ``turns``: a multi-turn dialogue, every turn kept;
    - ``instruction`` + ``input``: the non-empty ones joined with "\\n" (BiLLa's math sets have ``instruction: ""``,
      which must not become ``"Human: \\n{input}"``);
    - a task record (``input``, ``output``, ``type``): the task prompt and the input become the Human turn (pre prompt
      + "\\n" + input, or input + "\\n" + post prompt), the output with its rationale the Assistant turn; the
      placement is ``choice`` (one of ``task_choices``) or drawn with ``rng``.
    """
    if "turns" in record:
        return [(t["human"].strip(), t["assistant"].strip()) for t in record["turns"]]
    if "instruction" in record:
        question = "\n".join(part for part in (record["instruction"].strip(), record.get("input", "").strip()) if part)
        return [(question, record["output"].strip())]
    _, placement, prompt = choice or _pick(task_choices(record.get("type"), ctx, record["input"]), rng)
    parts = {"pre": (prompt, record["input"].strip()), "post": (record["input"].strip(), prompt)}
    question = "\n".join(parts.get(placement, (record["input"].strip(),)))
    return [(question, record["output"].strip())]


def _dialogue_example(turns: list[tuple[str, str]], ctx: ObjectiveContext) -> Example | None:
    ids, labels = [ctx.bos_id], [IGNORE]
    for i, (question, answer) in enumerate(turns):
        if not answer:
            continue
        prefix = ctx.encode(("\n" if i else "") + dialogue_prompt(question))
        target = [*ctx.encode(answer), ctx.eos_id]
        ids += prefix + target
        labels += [IGNORE] * len(prefix) + target
    example = Example(ids[: ctx.max_len], labels[: ctx.max_len])
    return example if example.num_targets else None


def dialogue(record: dict, ctx: ObjectiveContext, rng: random.Random) -> Example | None:
    """Human/Assistant dialogue; loss on every Assistant answer (+ EOS), none on Human turns.

    ``record`` is a multi-turn dialogue (``turns``), an instruction record or a task record (``dialogue_turns``).
    BOS + ``"Human: {q1}\\nAssistant: "`` (no loss) + ``a1`` + EOS (loss), then ``"\\nHuman: {q2}\\nAssistant: "`` ...;
    the prefix and the answer are encoded separately, so the answer's tokens are those generated after the prompt.
    """
    return _dialogue_example(dialogue_turns(record, ctx, rng), ctx)


OBJECTIVES: dict[str, Callable[[dict, ObjectiveContext, random.Random], Example | None]] = {
    "causal_lm": causal_lm,
    "conditional_generation": conditional_generation,
    "translation": translation,
    "task": task,
    "dialogue": dialogue,
}


@dataclass(frozen=True)
class Variants:
    """Every example a record can become, tokenised once, with the probability BiLLa's draw gives it.

    ``cut=True`` (conditional generation): one example whose labels are all targets; ``draw`` masks the tokens before
    a cut point drawn per visit. Probabilities sum to 1.
    """

    examples: tuple[Example, ...]
    weights: tuple[float, ...]
    cut: bool = False

    def draw(self, rng: random.Random) -> Example:
        """The example of one visit (``rng`` = ``record_rng(seed, source, key, visit)``)."""
        if self.cut:
            ids = self.examples[0].input_ids
            pos = cut_point(len(ids), rng)
            return Example(list(ids), [IGNORE] * pos + list(ids[pos:]))
        if len(self.examples) == 1:
            return self.examples[0]
        return rng.choices(self.examples, weights=self.weights)[0]


def _variants(pairs: list[tuple[float, Example | None]]) -> Variants | None:
    """Drop choices that leave no target token (after truncation); renormalise the rest; None when none is left."""
    kept = [(w, e) for w, e in pairs if e is not None]
    if not kept:
        return None
    total = sum(w for w, _ in kept)
    return Variants(tuple(e for _, e in kept), tuple(w / total for w, _ in kept))


def variants(name: str, record: dict, ctx: ObjectiveContext) -> Variants | None:
    """All examples objective ``name`` can make of ``record`` (see ``Variants``); None when none has a target."""
    if name == "conditional_generation":
        ids = [ctx.bos_id, *ctx.encode(record["text"]), ctx.eos_id][: ctx.max_len]
        return Variants((Example(ids, list(ids)),), (1.0,), cut=True) if len(ids) >= 2 else None
    if name == "translation":
        choices = translation_choices(ctx)
        return _variants([(w, translation_example(record, ctx, d, p)) for w, d, p in choices])
    if name == "task":
        choices = task_choices(record.get("type"), ctx, record["input"])
        return _variants([(w, task_example(record, ctx, pl, p)) for w, pl, p in choices])
    if name == "dialogue":
        if "turns" in record or "instruction" in record:
            return _variants([(1.0, _dialogue_example(dialogue_turns(record, ctx), ctx))])
        choices = task_choices(record.get("type"), ctx, record["input"])
        return _variants([(c[0], _dialogue_example(dialogue_turns(record, ctx, choice=c), ctx)) for c in choices])
    if name in OBJECTIVES:  # causal_lm and any objective without random choices: its one example
        return _variants([(1.0, OBJECTIVES[name](record, ctx, random.Random(0)))])
    raise KeyError(f"unknown objective {name!r}; known objectives: {sorted(OBJECTIVES)}")
