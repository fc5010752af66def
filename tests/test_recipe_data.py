"""Recipe fidelity, data: random choices redrawn per visit (exact, resumable), BiLLa's task prompt placement,
prompt sets through config, stage 2's right-stripped translation source."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm

from billa.data.cache import ObjectiveSettings, tokenize_source
from billa.data.mixing import MixedDataset
from billa.data.objectives import IGNORE, ObjectiveContext, load_prompts, task_choices, variants

PROMPTS = {
    "translation.en2zh": ["to zh:", "in Chinese:"],
    "translation.zh2en": ["to en:"],
    "calc.pre.prompt": [],
}


def _jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sp(sample_tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(Path(sample_tokenizer_dir) / "tokenizer.model"))


def _prompt_dir(root: Path, files: dict[str, list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, lines in files.items():
        (root / f"{stem}.prompt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _source(tmp_path, tokenizer_dir, name, fmt, objective, records, prompts, extra_newline=False, types=()):
    settings = ObjectiveSettings(name, fmt, objective, 128, 7, extra_newline, prompt_types=types)
    path = _jsonl(tmp_path / "data" / f"{name}.jsonl", records)
    source, _ = tokenize_source([path], settings, tokenizer_dir, prompts, tmp_path / "cache")
    return source


def test_translation_pairs_train_in_both_directions_over_epochs(tmp_path, sample_tokenizer_dir, sp):
    """Bug caught: direction and prompt drawn once per record and cached, so each pair trains one way all run."""
    prompts = {"translation.en2zh": ["to zh:", "in Chinese:"], "translation.zh2en": ["to en:"]}
    pairs = [{"en_text": f"Sentence {i}.", "zh_text": f"句子{i}。"} for i in range(3)]
    source = _source(tmp_path, sample_tokenizer_dir, "translate", "translation", "translation", pairs, prompts)
    assert [len(source.variants(i).examples) for i in range(3)] == [3, 3, 3]  # 2 en->zh prompts + 1 zh->en
    mixed = MixedDataset({"translate": source}, {"translate": 1}, num_samples=3 * 24, seed=7)
    seen: dict[int, Counter] = {i: Counter() for i in range(3)}
    for index in range(len(mixed)):
        name, record, visit = mixed.locate_visit(index)
        sample = mixed[index]
        n_prefix = sum(label == IGNORE for label in sample["labels"])
        prefix = sp.decode([int(t) for t in sample["input_ids"][1:n_prefix]])
        seen[record][prefix.split("\n")[1]] += 1
        assert visit == index // 3  # one visit per epoch of the source
    for record, prompts_seen in seen.items():
        # 24 visits: direction is a fair coin, so both occur (P(miss) = 2 x 0.5^24); en->zh picks both lines
        assert set(prompts_seen) == {"to zh:", "in Chinese:", "to en:"}, (record, prompts_seen)
        assert 4 <= prompts_seen["to en:"] <= 20
    # exact: the same stream from a fresh dataset (a resumed run rebuilds it), sample by sample
    again = MixedDataset({"translate": source}, {"translate": 1}, num_samples=3 * 24, seed=7)
    assert all(list(again[i]["input_ids"]) == list(mixed[i]["input_ids"]) for i in range(len(mixed)))
    other_seed = MixedDataset({"translate": source}, {"translate": 1}, num_samples=3 * 24, seed=8)
    assert any(list(other_seed[i]["input_ids"]) != list(mixed[i]["input_ids"]) for i in range(len(mixed)))


def test_cut_point_is_redrawn_per_visit(tmp_path, sample_tokenizer_dir):
    """Bug caught: the conditional-generation cut cached with the tokens, the same prefix masked every epoch."""
    text = {"text": "今天天气很好，我们一起去公园散步吧。The weather is nice today, let us walk in the park together."}
    source = _source(tmp_path, sample_tokenizer_dir, "zh", "pile", "conditional_generation", [text], {})
    cuts = {sum(label == IGNORE for label in source.example(0, visit)["labels"]) for visit in range(30)}
    length = len(source.example(0)["input_ids"])
    assert len(cuts) > 3 and min(cuts) >= int(0.2 * length) + 1 and max(cuts) <= int(0.7 * length)
    assert source.example(0, 5) == source.example(0, 5)
    # the seed drives only the draws: another seed reuses the cached shard and draws other cuts
    settings = ObjectiveSettings("zh", "pile", "conditional_generation", 128, 8, False)
    reseeded, stats = tokenize_source(
        [str(tmp_path / "data" / "zh.jsonl")], settings, sample_tokenizer_dir, {}, tmp_path / "cache"
    )
    assert stats["reused_shards"] == 1
    assert [reseeded.example(0, v) for v in range(10)] != [source.example(0, v) for v in range(10)]


def test_stage2_translation_source_is_right_stripped(sample_tokenizer_dir, sp):
    """Bug caught: stage 2 keeps the source's trailing spaces/newlines before "\\n" + prompt (BiLLa strips them)."""
    ctx = ObjectiveContext(sp.encode, 1, 2, 128, {"translation.en2zh": ["to zh:"], "translation.zh2en": ["to en:"]})
    ctx.translation_extra_newline = True
    found = variants("translation", {"en": "Hello there.  \n", "zh": "你好。 "}, ctx)
    prefixes = {tuple(e.input_ids[1 : 1 + sum(x == IGNORE for x in e.labels) - 1]) for e in found.examples}
    assert prefixes == {tuple(sp.encode("Hello there.\nto zh:\n")), tuple(sp.encode("你好。\nto en:\n"))}
    ctx.translation_extra_newline = False  # stage 1: source + "\n" + prompt, unstripped
    stage1 = variants("translation", {"en": "Hi. ", "zh": "嗨。"}, ctx)
    assert [1, *sp.encode("Hi. \nto zh:")] in [
        e.input_ids[: len(sp.encode("Hi. \nto zh:")) + 1] for e in stage1.examples
    ]


def test_task_prompt_placement_is_billas_coin_flip():
    """Bug caught: with one prompt file the placement is forced to that file (BiLLa: that prompt or none, 1/2 each),
    or both files' lines are pooled so a file with more lines wins more often."""
    ctx = ObjectiveContext(list, 1, 2, 64, {"both.pre": ["P1", "P2", "P3"], "both.post": ["Q1"], "one.post": ["Q"]})
    both = {(placement, line): w for w, placement, line in task_choices("both", ctx)}
    assert both == pytest.approx(
        {("pre", "P1"): 1 / 6, ("pre", "P2"): 1 / 6, ("pre", "P3"): 1 / 6, ("post", "Q1"): 0.5}
    )
    one = {(placement, line): w for w, placement, line in task_choices("one", ctx)}
    assert one == {("post", "Q"): 0.5, (None, ""): 0.5}
    assert task_choices("", ctx) == [(1.0, None, "")] == task_choices("unknown", ctx)


def test_task_record_draws_prompt_and_no_prompt_over_visits(tmp_path, sample_tokenizer_dir, sp):
    """Bug caught: a one-file task type always gets its prompt (or never), instead of BiLLa's per-visit coin flip."""
    prompts = {"math.post": ["Solve it."]}
    record = {"id": "1", "input": "1+2=? ", "output": "3 \n", "type": "ape210k"}
    source = _source(
        tmp_path, sample_tokenizer_dir, "zh-reasoning", "task", "task", [record], prompts, types=(("ape210k", "math"),)
    )
    layouts = Counter()
    for visit in range(40):
        sample = source.example(0, visit)
        n_prefix = sum(label == IGNORE for label in sample["labels"])
        layouts[sp.decode([int(t) for t in sample["input_ids"][1:n_prefix]])] += 1
        assert [int(t) for t in sample["input_ids"][n_prefix:]] == [*sp.encode("3"), 2]  # output.rstrip() + EOS
    no_prompt = sp.decode(sp.encode("1+2=?  "))  # BiLLa: input (unstripped) + " "
    assert set(layouts) == {sp.decode(sp.encode("1+2=?\nSolve it.\n")), no_prompt}
    assert 8 <= layouts[no_prompt] <= 32


def test_prompt_set_in_billas_layout_and_type_map_from_config(tmp_path, compose):
    """Bug caught: type names of BiLLa's data hard-coded to prompt files in code, or a user's prompt set (BiLLa's
    prompts/ + translate/ layout) ignored."""
    cfg = compose(["stage=task_mix"])
    assert cfg.data.prompt_types.ape210k == "math" and cfg.data.prompt_types.squad2 == "reading_comprehension"
    repo = tmp_path / "corpora"
    _prompt_dir(repo / "prompts", {"ape210k.pre": ["请解答：", ""], "squad2.post": ["Answer the question."]})
    _prompt_dir(repo / "translate", {"en-zh": ["翻译成中文。"], "zh-en": ["Into English."]})
    prompts = load_prompts(
        repo / "prompts", {"en2zh": str(repo / "translate/en-zh.prompt"), "zh2en": str(repo / "translate/zh-en.prompt")}
    )
    assert prompts["ape210k.pre"] == ["请解答："]  # blank line skipped, lines stripped
    assert prompts["translation.en2zh"] == ["翻译成中文。"] and prompts["translation.zh2en"] == ["Into English."]
    ctx = ObjectiveContext(list, 1, 2, 64, prompts, prompt_types={"ape210k": "math", "webqa": "qa"})
    # BiLLa's own file for the type wins over the map; pre only: the prompt or none
    assert {(p, line) for _, p, line in task_choices("ape210k", ctx)} == {("pre", "请解答："), (None, "")}
    with pytest.raises(FileNotFoundError, match="data.translation_prompts.zh2en"):
        load_prompts(repo / "prompts", {"zh2en": str(repo / "missing.prompt")})
