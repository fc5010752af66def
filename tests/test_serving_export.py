"""Serve-ready exports: the chat template renders the SFT objective's ids; generation defaults; the model card."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from billa.data.objectives import IGNORE, ObjectiveContext, dialogue
from billa.export import save_hf_model
from billa.model_card import ModelCard, hub_datasets, realised_mix, render_model_card
from billa.tokenizer.chat import write_serving_config
from billa.tokenizer.load import copy_tokenizer_files

from .helpers import tiny_llama

TURNS = [  # Chinese and English, answers starting with a CJK character, a digit, a letter, punctuation
    ("把这句话翻译成英文：我喜欢喝茶。", "I like drinking tea."),
    ("What is 17 + 25?", "42"),
    ("再说一遍，用中文。", "答案是四十二。"),
    ("Why?", "(17 + 25 = 42) because 17 + 3 = 20 and 20 + 22 = 42."),
]


@pytest.fixture(scope="module")
def served(sample_tokenizer_dir, tmp_path_factory):
    """A tokenizer directory as the export writes it, loaded the way a chat server loads it."""
    out = tmp_path_factory.mktemp("served-tokenizer")
    copy_tokenizer_files(sample_tokenizer_dir, out)
    write_serving_config(out, model_max_length=128)
    return AutoTokenizer.from_pretrained(out)


def _ctx(tokenizer) -> ObjectiveContext:
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731  as billa.data.cache
    return ObjectiveContext(encode, tokenizer.bos_token_id, tokenizer.eos_token_id, max_len=10_000)


def _prefix(example) -> list[int]:
    """The ids before the last answer: what the objective trains the model to continue from."""
    last_prompt_end = max(i for i, label in enumerate(example.labels) if label == IGNORE) + 1
    return example.input_ids[:last_prompt_end]


def _chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, **kwargs)["input_ids"])


def test_single_turn_generation_prompt_is_the_objectives_prefix(served):
    """Catches a template without BOS, without the space after "Assistant:", or with a different line break; and an
    instruction's input joined differently from the objective (a system message plays the instruction)."""
    ctx = _ctx(served)
    for question, answer in TURNS:
        example = dialogue({"instruction": question, "input": "", "output": answer}, ctx, random.Random(0))
        messages = [{"role": "user", "content": question}]
        ids = _chat_ids(served, messages, add_generation_prompt=True)
        assert ids == _prefix(example)
        assert ids[0] == served.bos_token_id and served.convert_ids_to_tokens(ids[-1]) == "▁"  # the trailing space
    record = {"instruction": "Translate into English.", "input": "我喜欢喝茶。", "output": "I like tea."}
    example = dialogue(record, ctx, random.Random(0))
    messages = [{"role": "system", "content": record["instruction"]}, {"role": "user", "content": record["input"]}]
    assert _chat_ids(served, messages, add_generation_prompt=True) == _prefix(example)


def test_multi_turn_history_and_full_dialogue_match_the_objective(served):
    """Catches turns joined without "\\n", an answer without EOS, and a past answer rendered without the extra space
    the objective's separate encoding gives it (the ids would differ from the second turn on)."""
    ctx = _ctx(served)
    for n in range(2, len(TURNS) + 1):
        turns = TURNS[:n]
        example = dialogue({"turns": [{"human": q, "assistant": a} for q, a in turns]}, ctx, random.Random(0))
        history = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        assert _chat_ids(served, history[:-1], add_generation_prompt=True) == _prefix(example), n
        assert _chat_ids(served, history) == example.input_ids, n  # the whole dialogue, answers and EOS included
    rendered = served.apply_chat_template(history[:3], add_generation_prompt=True, tokenize=False)
    assert rendered == f"<s>Human: {TURNS[0][0]}\nAssistant:  {TURNS[0][1]}</s>\nHuman: {TURNS[1][0]}\nAssistant: "


def test_template_rejects_conversations_outside_the_format(served):
    with pytest.raises(Exception, match="two user messages in a row"):
        served.apply_chat_template([{"role": "user", "content": "a"}] * 2, add_generation_prompt=True)
    with pytest.raises(Exception, match="unsupported role tool"):
        served.apply_chat_template([{"role": "tool", "content": "a"}])


def test_export_is_ready_to_serve(sample_tokenizer_dir, tmp_path):
    """Catches model_max_length left at 1e30, a missing pad token (batch generation fails), generation settings that
    are not BiLLa's, a card not written, and a chat template that does not survive save/load."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(sample_tokenizer_dir)
    model = tiny_llama(len(tokenizer), num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    card = ModelCard(
        model_name="tiny",
        stage="sft",
        mix=realised_mix({"cot-en": 2, "others": 6}, {"train/samples/cot-en": 24.0, "train/samples/others": 72.0}),
        schedule={"optimizer steps": "6 of 6"},
        hardware={"device": "cpu"},
        metrics={"val/loss": 2.5},
        command="python train.py stage=sft",
    )
    out = save_hf_model(model, sample_tokenizer_dir, tmp_path / "hf", model_max_length=128, card=card)
    served = AutoTokenizer.from_pretrained(out)
    assert served.model_max_length == 128 and served.pad_token_id == served.unk_token_id == 0
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    assert generation.do_sample and generation.temperature == 0.7 and generation.max_new_tokens == 1024
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert "Human: " in config["chat_template"] and "local_files_only" not in config
    assert (tmp_path / "hf" / "README.md").read_text().startswith("---\nlanguage:\n- zh\n- en\n")
    batch = served(["你好", "What is 17 + 25?"], padding=True, return_tensors="pt")  # needs the pad token
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    generated = reloaded.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)


def test_model_card_metadata_and_body():
    """Catches Hub metadata that is not valid YAML or lacks a required field, and a body that does not state the
    stage, the realised mix, the schedule, the hardware, the final figures and the command."""
    mix = realised_mix(
        {"zh": 4, "en": 4, "translate": 2},
        {"train/samples/zh": 64.0, "train/samples/en": 64.0, "train/samples/translate": 32.0, "train/tokens/zh": 9e3},
    )
    assert mix["zh"] == {"weight": 4, "samples": 64, "tokens": 9000, "share": 0.4}
    assert mix["translate"]["share"] == 0.2
    card = ModelCard(
        model_name="llama-7b",
        stage="pretrain",
        mix=mix,
        schedule={"optimizer steps": "100,000 of 100,000", "sequence length": 1024},
        hardware={"device": "NVIDIA A100-SXM4-80GB", "devices": "8 x 1 node(s)"},
        metrics={"val/loss": 1.9325, "val/ppl": 6.906},
        command="python train.py model=llama-7b data=billa hardware=8xa100",
        base_model="huggyllama/llama-7b",
        datasets=["wmt/wmt19", *hub_datasets({"en": {"train": "hf://EleutherAI/pile:all@train", "val": None}})],
    )
    text = render_model_card(card)
    _, meta, body = text.split("---\n", 2)
    meta = yaml.safe_load(meta)
    assert meta["language"] == ["zh", "en"] and meta["license"] == "other" and meta["license_name"]
    assert meta["base_model"] == "huggyllama/llama-7b"
    assert meta["datasets"] == ["wmt/wmt19", "EleutherAI/pile"]
    assert {"billa", "stage:pretrain"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    assert "stage 1 of 3" in body and "`stage=pretrain`" in body
    assert "| `zh` | 4 | 64 | 40.0% | 9,000 |" in body and "| `translate` | 2 | 32 | 20.0% | - |" in body
    assert "| sequence length | 1,024 |" in body and "NVIDIA A100-SXM4-80GB" in body
    assert "| `val/loss` | 1.933 |" in body
    assert "python train.py model=llama-7b data=billa hardware=8xa100" in body


@pytest.fixture(scope="module")
def whitespace_merging_tokenizer(tmp_path_factory):
    """A SentencePiece BPE tokenizer that merges "▁▁" early (trained on indented code), unlike the sample one."""
    import sentencepiece as spm

    from billa.tokenizer.load import save_tokenizer_dir

    root = tmp_path_factory.mktemp("ws-tokenizer")
    text = [f"def f(x):    return x  # {i}  two  spaces\nThe answer is {i}. 答案是{i}" for i in range(2000)]
    (root / "corpus.txt").write_text("\n".join(text), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"),
        model_prefix=str(root / "ws"),
        vocab_size=340,
        model_type="bpe",
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        minloglevel=2,
    )
    out = save_tokenizer_dir(root / "ws.model", root / "tok")
    write_serving_config(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "▁▁" in tokenizer.get_vocab()
    return tokenizer


def test_whitespace_merging_vocabulary_current_turn_exact_history_same_text(whitespace_merging_tokenizer):
    """The documented limit, pinned down: with a "▁▁" piece the generation prompt of a single turn and the current
    turn are still exact; a past answer may be segmented differently ("▁▁" for "▁", "▁") but is the same text.
    Catches a template whose current-turn prompt drifts from the objective's with such vocabularies (LLaMA's)."""
    tokenizer = whitespace_merging_tokenizer
    ctx = _ctx(tokenizer)
    turns = [("q1", "42"), ("q2", "The answer is 42."), ("q3", "答案是42")]
    example = dialogue({"turns": [{"human": q, "assistant": a} for q, a in turns]}, ctx, random.Random(0))
    single = dialogue({"instruction": "q1", "output": "42"}, ctx, random.Random(0))
    assert _chat_ids(tokenizer, [{"role": "user", "content": "q1"}], add_generation_prompt=True) == _prefix(single)
    history = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    chat = _chat_ids(tokenizer, history[:-1], add_generation_prompt=True)
    trained = _prefix(example)
    eos = tokenizer.eos_token_id
    last_chat, last_trained = (
        chat[len(chat) - chat[::-1].index(eos) :],
        trained[len(trained) - trained[::-1].index(eos) :],
    )
    assert last_chat == last_trained  # "\nHuman: q3\nAssistant: ": its own segment after </s>
    assert chat != trained  # the sample tokenizer's exactness does not carry over to this vocabulary ...
    assert tokenizer.decode(chat) == tokenizer.decode(trained)  # ... but the text the model reads is the same
