"""Golden token/label tests for every objective, with the real sample tokenizer (SentencePiece ids)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from billa.data.objectives import (
    IGNORE,
    ObjectiveContext,
    causal_lm,
    conditional_generation,
    dialogue,
    record_rng,
    task,
    translation,
)


@pytest.fixture(scope="module")
def sp(sample_tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(Path(sample_tokenizer_dir) / "tokenizer.model"))


@pytest.fixture
def ctx(sp):
    prompts = {
        "translation.en2zh": ["翻译成中文："],
        "translation.zh2en": ["Translate into English:"],
        "math.pre": ["Solve the problem step by step."],
        "math.post": ["请一步一步地解答。"],
        "qa.post": ["Answer:"],
    }
    return ObjectiveContext(encode=sp.encode, bos_id=1, eos_id=2, max_len=128, prompts=prompts)


def test_dialogue_single_turn_with_the_trailing_space(sp, ctx):
    example = dialogue({"instruction": "1+1等于几？", "input": "", "output": "等于2。"}, ctx, record_rng(0, "s", 0))
    prefix = sp.encode("Human: 1+1等于几？\nAssistant: ")
    answer = sp.encode("等于2。")
    assert example.input_ids == [1, *prefix, *answer, 2]
    assert example.labels == [IGNORE] * (1 + len(prefix)) + [*answer, 2]
    assert sp.id_to_piece(prefix[-1]) == "▁"  # the space after "Assistant:" is its own token at the prompt's end
    assert sp.decode(prefix).endswith("Assistant: ")


def test_dialogue_with_input_and_multi_turn(sp, ctx):
    one = dialogue({"instruction": "Translate", "input": "你好", "output": "Hello"}, ctx, record_rng(0, "s", 0))
    assert one.input_ids[1 : 1 + len(sp.encode("Human: Translate\n你好\nAssistant: "))] == sp.encode(
        "Human: Translate\n你好\nAssistant: "
    )
    record = {"turns": [{"human": "Hi", "assistant": "Hello!"}, {"human": "你是谁？", "assistant": "我是BiLLa。"}]}
    example = dialogue(record, ctx, record_rng(0, "s", 1))
    p1, a1 = sp.encode("Human: Hi\nAssistant: "), sp.encode("Hello!")
    p2, a2 = sp.encode("\nHuman: 你是谁？\nAssistant: "), sp.encode("我是BiLLa。")
    assert example.input_ids == [1, *p1, *a1, 2, *p2, *a2, 2]
    assert example.labels == [IGNORE] * (1 + len(p1)) + [*a1, 2] + [IGNORE] * len(p2) + [*a2, 2]


def test_translation_both_directions(sp, ctx):
    seen = set()
    for key in range(40):
        example = translation({"en": "Good morning.", "zh": "早上好。"}, ctx, record_rng(0, "translate", key))
        en2zh = (sp.encode("Good morning.\n翻译成中文："), sp.encode("早上好。"))
        zh2en = (sp.encode("早上好。\nTranslate into English:"), sp.encode("Good morning."))
        for name, (prefix, target) in (("en2zh", en2zh), ("zh2en", zh2en)):
            if example.input_ids == [1, *prefix, *target, 2]:
                assert example.labels == [IGNORE] * (1 + len(prefix)) + [*target, 2]
                seen.add(name)
    assert seen == {"en2zh", "zh2en"}  # both directions occur, and every example is one of the two layouts
    ctx.translation_extra_newline = True  # stage 2: source + "\n" + prompt + "\n"
    example = translation({"en": "Hi.", "zh": "嗨。"}, ctx, record_rng(0, "translate", 0))
    n_prefix = sum(label == IGNORE for label in example.labels) - 1  # minus BOS
    assert sp.decode(example.input_ids[1 : 1 + n_prefix]) in ("Hi.\n翻译成中文：\n", "嗨。\nTranslate into English:\n")


def test_task_pre_post_and_no_prompt(sp, ctx):
    layouts = set()
    for key in range(40):
        example = task({"input": "1+2=? ", "output": "3 \n", "type": "math"}, ctx, record_rng(0, "t", key))
        pre = sp.encode("Solve the problem step by step.\n1+2=?\n\n")
        post = sp.encode("1+2=?\n请一步一步地解答。\n")
        target = [*sp.encode("3"), 2]  # output.rstrip() + EOS
        for name, prefix in (("pre", pre), ("post", post)):
            if example.input_ids == [1, *prefix, *target]:
                assert example.labels == [IGNORE] * (1 + len(prefix)) + target
                layouts.add(name)
    assert layouts == {"pre", "post"}
    only_post = task({"input": "Q?", "output": "A", "type": "qa"}, ctx, record_rng(0, "t", 0))
    assert only_post.input_ids == [1, *sp.encode("Q?\nAnswer:\n"), *sp.encode("A"), 2]
    untyped = task({"input": "Q?", "output": "A", "type": None}, ctx, record_rng(0, "t", 0))
    assert untyped.input_ids == [1, *sp.encode("Q? "), *sp.encode("A"), 2]  # no prompt: input + " "


def test_plain_text_objectives(sp, ctx):
    text = "今天天气很好。The weather is nice today."
    ids = [1, *sp.encode(text), 2]
    assert causal_lm({"text": text}, ctx, record_rng(0, "zh", 0)).labels == ids
    example = conditional_generation({"text": text}, ctx, record_rng(0, "zh", 0))
    cut = sum(label == IGNORE for label in example.labels)
    length = len(ids)
    assert example.input_ids == ids
    assert int(0.2 * length) + 1 <= cut <= int(0.7 * length)
    assert example.labels == [IGNORE] * cut + ids[cut:]


def test_truncation_keeps_targets_or_drops_the_example(sp, ctx):
    ctx.max_len = 8
    long = dialogue({"instruction": "x " * 50, "input": "", "output": "y"}, ctx, record_rng(0, "s", 0))
    assert long is None  # the prompt alone fills max_len: no target token survives, the caller counts it
    ctx.max_len = 1000
    text = "字" * 3000
    ctx.max_len = 64
    assert len(causal_lm({"text": text}, ctx, record_rng(0, "zh", 0)).input_ids) == 64
