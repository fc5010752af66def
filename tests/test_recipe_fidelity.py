"""Recipe fidelity: billa's objectives build, token for token, what BiLLa's train_codes build, and the prompt rules.

The encoder is a character code (one id per character), so every expected sequence below is written out from
BiLLa's rules (``pretrain_main.py``, ``task_instruct_tuning_main.py``, ``alignment_sft_main.py``) as text: BOS, then
the prefix BiLLa assembles (no loss), then the target and EOS (loss). BiLLa's ``loss_mask`` of 0/1 is billa's label
-100 / token id: the loss at position t + 1 is on where the mask is 1.
"""

from __future__ import annotations

import random

import pytest

from billa.data.objectives import (
    IGNORE,
    ObjectiveContext,
    Variants,
    task_choices,
    task_example,
    translation_example,
    variants,
)

BOS, EOS = 1, 2


def _ctx(max_len: int = 512, **kw) -> ObjectiveContext:
    prompts = {
        "translation.en2zh": ["Translate the text above into Chinese.", "请把这句话翻译成中文。"],
        "translation.zh2en": ["请把这句话翻译成英语。"],
        "summary.pre": ["请为下面的文章写一个摘要。", "Summarize the following text."],
        "summary.post": ["用一两句话概括上文。", "Summarize the text above in one or two sentences."],
    }
    return ObjectiveContext(encode=lambda s: [ord(c) for c in s], bos_id=BOS, eos_id=EOS, max_len=max_len, **kw,
                            prompts=prompts, prompt_types={"cnndm": "summary"})  # fmt: skip


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def _expected(prefix: str, target: str, max_len: int = 512) -> tuple[list[int], list[int]]:
    """BiLLa: encode(prefix, bos=True, eos=False) + encode(target, bos=False, eos=True), cut to max_seq_length;
    loss_mask 0 on the first part, 1 on the second."""
    first, second = [BOS, *_ids(prefix)], [*_ids(target), EOS]
    ids = (first + second)[:max_len]
    mask = ([0] * len(first) + [1] * len(second))[:max_len]
    return ids, [i if m else IGNORE for i, m in zip(ids, mask, strict=True)]


def test_stage1_text_cut_is_billas_draw():
    """Stage 1 text: ids = encode(text) (BOS + text + EOS), pos = randint(int(0.2L) + 1, int(0.7L)), loss after pos.

    With the same generator state billa draws BiLLa's pos. Catches a cut range off by one (int(0.2L) without + 1,
    or a bound from the text without BOS/EOS) and a cut that masks pos itself or the token after it.
    """
    text = "The quick brown fox."  # 20 characters: L = 22 with BOS and EOS
    found = variants("conditional_generation", {"text": text}, _ctx())
    assert found.cut and len(found.examples) == 1
    ids = [BOS, *_ids(text), EOS]
    assert found.examples[0].input_ids == ids
    for seed in range(20):
        pos = random.Random(seed).randint(int(0.2 * 22) + 1, int(0.7 * 22))  # BiLLa's line, 5..15
        example = found.draw(random.Random(seed))
        assert example.input_ids == ids
        assert example.labels == [IGNORE] * pos + ids[pos:]


def test_stage1_translation_is_source_newline_prompt():
    """Stage 1 translation: prefix = input + "\\n" + prompt (no strip, no trailing newline); target = the other side.

    Catches stage 2's trailing newline or a right-strip leaking into stage 1, and swapped source/target sides.
    """
    record = {"en": "Good morning. ", "zh": "早上好。"}
    example = translation_example(record, _ctx(), "en2zh", "Translate the text above into Chinese.")
    assert (example.input_ids, example.labels) == _expected(
        "Good morning. \nTranslate the text above into Chinese.", "早上好。"
    )
    example = translation_example(record, _ctx(), "zh2en", "请把这句话翻译成英语。")
    assert (example.input_ids, example.labels) == _expected("早上好。\n请把这句话翻译成英语。", "Good morning. ")


def test_stage2_translation_strips_the_source_and_ends_the_prompt_with_a_newline():
    """Stage 2 translation (BiLLa's post_prompt): input.rstrip() + "\\n" + prompt + "\\n"."""
    record = {"en": "Good morning. ", "zh": "早上好。"}
    example = translation_example(record, _ctx(translation_extra_newline=True), "en2zh", "请把这句话翻译成中文。")
    assert (example.input_ids, example.labels) == _expected("Good morning.\n请把这句话翻译成中文。\n", "早上好。")


@pytest.mark.parametrize(
    ("placement", "prompt", "prefix"),
    [
        ("pre", "Summarize the following text.", "Summarize the following text.\nA long article.\n\n"),
        ("post", "Summarize the text above in one or two sentences.",
         "A long article.\nSummarize the text above in one or two sentences.\n"),
        (None, "", "A long article.  \n "),  # no prompt: input + " ", not stripped
    ],
)  # fmt: skip
def test_stage2_task_prefixes_are_billas(placement, prompt, prefix):
    """Stage 2 task: pre = prompt + "\\n" + input.rstrip() + "\\n\\n"; post = input.rstrip() + "\\n" + prompt + "\\n";
    no prompt = input + " "; target = output.rstrip() + EOS.

    Catches a swapped pre/post layout, a missing blank line after a pre prompt, and an unstripped output.
    """
    record = {"input": "A long article.  \n", "output": "Short.\n\n", "type": "cnndm"}
    example = task_example(record, _ctx(), placement, prompt)
    assert (example.input_ids, example.labels) == _expected(prefix, "Short.")


def test_stage2_task_truncation_keeps_billas_prefix_and_cuts_the_target():
    """BiLLa cuts the joined ids to max_seq_length (the EOS and the target's tail go first)."""
    record = {"input": "Q?", "output": "abcdefgh", "type": ""}
    example = task_example(record, _ctx(max_len=8), None, "")
    assert (example.input_ids, example.labels) == _expected("Q? ", "abcdefgh", max_len=8)
    assert example.labels[-1] != IGNORE and EOS not in example.input_ids


def test_stage3_dialogue_is_human_assistant_with_stripped_fields():
    """Stage 3: "Human: " + instruction + "\\n" + input + "\\n" (each only when non-empty, stripped) + "Assistant: ",
    then output.strip() + EOS. BiLLa's math sets have instruction "": no empty line after "Human: "."""
    example = variants("dialogue", {"instruction": " Add. ", "input": "1+1\n", "output": " 2 \n"}, _ctx()).draw(None)
    assert (example.input_ids, example.labels) == _expected("Human: Add.\n1+1\nAssistant: ", "2")
    example = variants("dialogue", {"instruction": "", "input": "1+1", "output": "2"}, _ctx()).draw(None)
    assert (example.input_ids, example.labels) == _expected("Human: 1+1\nAssistant: ", "2")


def test_task_prompt_lines_follow_the_records_language():
    """data.prompt_language=match: a Chinese record draws only the Chinese lines of a mixed prompt file, an English
    record the English ones, each placement still 1/2; any: every line (BiLLa's draw over its whole file).

    Catches a Chinese record prompted in English (the mixed files of billa's prompt set) and a filter that drops
    the placement's probability mass.
    """
    ctx = _ctx()
    zh = task_choices("cnndm", ctx, "这是一篇很长的新闻报道。")
    assert sorted(p for _, _, p in zh) == ["用一两句话概括上文。", "请为下面的文章写一个摘要。"]
    en = task_choices("cnndm", ctx, "A long news report.")
    assert {p for _, _, p in en} == {
        "Summarize the following text.",
        "Summarize the text above in one or two sentences.",
    }
    assert sum(w for w, _, _ in zh) == pytest.approx(1.0) and {pl for _, pl, _ in zh} == {"pre", "post"}
    every = task_choices("cnndm", _ctx(prompt_language="any"), "这是一篇很长的新闻报道。")
    assert len(every) == 4


def test_unmapped_task_type_is_counted_and_an_error_under_raise():
    """A task type with no prompt file (BiLLa's own ``mediasum-abs`` if it were not mapped) is counted per type;
    on_error=raise stops at its first record naming file:line and the data.prompt_types key.

    Catches the silent no-prompt fallback the issue found (three of BiLLa's sample types got no prompt).
    """
    from billa.data.readers import DataFormatError, Record
    from billa.data.tokenise import ObjectiveSettings, count_unmapped_types

    ctx = _ctx()
    records = [
        Record({"input": "x", "output": "y", "type": "cnndm"}, "a.jsonl", 1),  # mapped
        Record({"input": "x", "output": "y", "type": "mediasum-abs"}, "a.jsonl", 2),
        Record({"input": "x", "output": "y", "type": ""}, "a.jsonl", 3),  # empty type: no prompt by design
        Record({"input": "x", "output": "y", "type": "mediasum-abs"}, "a.jsonl", 4),
    ]
    settings = dict(source="t", fmt="task", objective="task", max_len=64, seed=0, translation_extra_newline=True)
    counts: dict = {}
    count_unmapped_types(records, ObjectiveSettings(**settings, on_error="skip"), ctx, counts)
    assert counts == {"unmapped_type/mediasum-abs": 2}
    with pytest.raises(DataFormatError, match=r"a.jsonl:2: task type 'mediasum-abs'.*data.prompt_types.mediasum-abs"):
        count_unmapped_types(records, ObjectiveSettings(**settings, on_error="raise"), ctx, {})


def test_billas_sample_types_all_have_prompts():
    """Every task type in BiLLa's own sample files maps to a prompt file of billa's set (conf/train.yaml)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from billa.data.objectives import load_prompts, unmapped_type

    root = Path(__file__).resolve().parents[1]
    types = OmegaConf.load(root / "conf" / "train.yaml").data.prompt_types
    ctx = ObjectiveContext(None, BOS, EOS, 64, load_prompts(root / "conf" / "prompts"), False, dict(types))
    billas = ["hotpotqa", "mathqa", "wikihow-step", "squad2", "samsum", "mediasum-abs", "cnndm",
              "wikihow-gen-headlines", "dureader", "cmrc2018", "ape210k", "cnewsum-gen-abs"]  # fmt: skip
    assert [kind for kind in billas if unmapped_type(kind, ctx)] == []


def test_variants_carry_the_draw_probabilities():
    """Guard for the fixed draws above: a task record's variants are the choices of task_choices, weights summing
    to 1, so a per-visit draw picks among exactly the examples written out by hand."""
    record = {"input": "A long article.", "output": "Short.", "type": "cnndm"}
    found: Variants = variants("task", record, _ctx())
    assert len(found.examples) == 2 and sum(found.weights) == pytest.approx(1.0)


def test_recipe_table_keys_hold_the_values_it_states():
    """Every row of docs/recipe.md's recipe table that names `file: key` states billa's value first in its billa
    column; the file holds that value under that key.

    Catches the table drifting from the configs (a stage's lr, a hardware file's micro batch or the default loss
    normalisation changed without the table) and a key the table names that no longer exists.
    """
    import re
    from pathlib import Path

    import yaml
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "recipe.md").read_text(encoding="utf-8")
    table = text.split("## Recipe table", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    rows = [cells for cells in rows if cells[3].startswith("`conf/")]
    assert len(rows) >= 30, "the recipe table lost its config keys"
    wrong = []
    for cells in rows:
        fact, billa, key = cells[0].lstrip("| "), cells[2], cells[3]
        path, dotted = re.fullmatch(r"`(conf/[^:`]+\.yaml): ([^`]+)`", key.strip()).groups()
        stated = yaml.safe_load(re.search(r"`([^`]+)`", billa).group(1))
        node = OmegaConf.load(root / path)
        found = OmegaConf.select(node, dotted, default="<missing>")
        if "." not in dotted and dotted not in node:
            found = "<missing>"
        actual = OmegaConf.to_container(found) if OmegaConf.is_config(found) else found
        if actual != stated and not (isinstance(actual, float) and actual == pytest.approx(stated)):
            wrong.append(f"{fact}: {path} {dotted} = {actual!r}, table says {stated!r}")
    assert wrong == []


@pytest.mark.parametrize(
    ("config", "overrides", "expected"),
    [
        ("convert", ["op=expand_vocab", "model=llama-7b"], 14943),
        ("convert", ["op=expand_vocab"], None),
        ("train", ["pipeline=billa", "+op@pipeline.vocab=expand_vocab", "model=llama-7b"], 14943),
        ("train", ["pipeline=billa", "+op@pipeline.vocab=expand_vocab", "model=tiny"], None),
    ],
)
def test_llama_7b_vocabulary_step_defaults_to_billas_size(config, overrides, expected):
    """model=llama-7b gives the vocabulary step (convert.py and the pipeline's) BiLLa's 14,943 added pieces; without
    a model, or with the tiny one, every piece the Chinese model offers. Catches the 46,943-piece vocabulary needing
    op.added_pieces by hand again."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose(config, overrides=overrides)
    op = cfg.op if config == "convert" else cfg.pipeline.vocab
    assert op.added_pieces == expected
