"""Sample corpus formats, readers' errors, round-robin mixing and objective labels."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from billa.data.mixing import MixedDataset, round_robin_cycle
from billa.data.objectives import (
    IGNORE,
    Example,
    ObjectiveContext,
    conditional_generation,
    dialogue,
    record_rng,
    translation,
)
from billa.data.readers import DataFormatError, read_records


def test_sample_corpus_is_in_the_real_formats(sample_corpus):
    wudao = json.loads((sample_corpus / "wudao" / "train" / "00000.json").read_text(encoding="utf-8"))
    assert set(wudao[0]) == {"id", "uniqueKey", "titleUkey", "dataType", "title", "content"}
    pile = [json.loads(line) for line in (sample_corpus / "pile" / "train" / "00000.jsonl").open(encoding="utf-8")]
    assert pile[0]["meta"] == {"pile_set_name": "Pile-CC"}
    assert sum(ch.isascii() for ch in pile[0]["text"]) > 0.9 * len(pile[0]["text"])  # the English side
    pairs = [
        json.loads(line) for line in (sample_corpus / "translation" / "train" / "00000.jsonl").open(encoding="utf-8")
    ]
    assert set(pairs[0]) == {"en_text", "zh_text"}
    train = sum(1 for _ in read_records(sample_corpus / "translation" / "train", "translation", "t"))
    val = sum(1 for _ in read_records(sample_corpus / "translation" / "val.jsonl", "translation", "t"))
    from hsk_sentences_audio import load_sentences

    from billa.sample.corpus import has_translation

    unique = {s["chinese"] for s in load_sentences() if has_translation(s)}
    assert train + val == len(unique) > 4200  # every translated sentence once, none lost
    text = next(read_records(sample_corpus / "wudao" / "train", "wudao", "zh")).fields["text"]
    assert text == wudao[0]["title"] + "\n\n" + wudao[0]["content"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "pile.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"txt": "wrong key"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"{path}:3: PILE record lacks string field\(s\) \['text'\]"):
        list(read_records(path, "pile", "data.sources.en.train"))
    path.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"{path}:2: not valid JSON"):
        list(read_records(path, "pile", "data.sources.en.train"))


def test_missing_files_name_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.sources.zh.train: no file matches"):
        list(read_records(tmp_path / "nothing-*.json", "wudao", "data.sources.zh.train"))


def test_round_robin_is_exact_in_every_cycle():
    weights = {"zh": 4, "en": 4, "translate": 2}
    cycle = round_robin_cycle(weights)
    assert Counter(cycle) == Counter(weights) and len(cycle) == 10
    sources = {
        name: [Example([1, i], [1, i]) for i in range(n)] for name, n in (("zh", 7), ("en", 5), ("translate", 3))
    }
    data = MixedDataset(sources, weights, num_samples=160, seed=0)
    for start in range(0, 160, 10):  # every window of one cycle holds the exact ratio
        assert Counter(data[i]["source"] for i in range(start, start + 10)) == Counter(weights)
    # each source is walked as a permutation: every example once before any repeats
    zh = [data.locate(i)[1] for i in range(160) if data.locate(i)[0] == "zh"]
    assert sorted(zh[:7]) == list(range(7)) and sorted(zh[7:14]) == list(range(7))


def _ctx(max_len=64):
    vocab = {}

    def encode(text):  # one id per character, stable: enough to check the layout of ids and labels
        return [vocab.setdefault(ch, 10 + len(vocab)) for ch in text]

    prompts = {"translation.en2zh": ["to zh:"], "translation.zh2en": ["to en:"]}
    return ObjectiveContext(encode=encode, bos_id=1, eos_id=2, max_len=max_len, prompts=prompts)


def test_conditional_generation_cut_range_and_determinism():
    ctx = _ctx(max_len=1000)
    record = {"text": "x" * 98}  # L = 100 with BOS and EOS
    cuts = set()
    for key in range(200):
        example = conditional_generation(record, ctx, record_rng(0, "zh", key))
        cut = example.labels.index(next(label for label in example.labels if label != IGNORE))
        assert 21 <= cut <= 70  # [int(0.2 L) + 1, int(0.7 L)]
        assert example.labels[cut:] == example.input_ids[cut:]
        cuts.add(cut)
    assert len(cuts) > 20  # really random over records
    again = conditional_generation(record, ctx, record_rng(0, "zh", 7))
    assert again == conditional_generation(record, ctx, record_rng(0, "zh", 7))


def test_translation_masks_the_source_and_prompt():
    ctx = _ctx()
    example = translation({"en": "hi", "zh": "你好"}, ctx, record_rng(0, "translate", 0))
    targets = [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
    assert targets[-1] == 2  # EOS carries loss
    decoded_prefix_len = example.labels.index(targets[0])
    assert example.input_ids[0] == 1 and all(label == IGNORE for label in example.labels[:decoded_prefix_len])
    assert len(targets) - 1 in (len("hi"), len("你好"))


def test_dialogue_template_keeps_the_space_after_assistant():
    seen = []
    ctx = _ctx()
    inner = ctx.encode
    ctx.encode = lambda text: seen.append(text) or inner(text)
    example = dialogue({"instruction": "1+1?", "input": "", "output": "2"}, ctx, record_rng(0, "sft", 0))
    assert seen[0] == "Human: 1+1?\nAssistant: "
    assert [label for label in example.labels if label != IGNORE] == [*inner("2"), 2]
