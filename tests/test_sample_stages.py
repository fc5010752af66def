"""Stages 2 and 3 on the embedded sample: the sets exist in their real formats, SFT readers and labels, no replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from billa.data.objectives import IGNORE, ObjectiveContext, dialogue, record_rng
from billa.data.readers import DataFormatError, read_records
from billa.train import stage_datamodule

from .conftest import compose_train

STAGE2_TASKS = [
    "zh-qa-long", "zh-qa-short", "zh-reasoning", "zh-summary", "en-hotpotqa",
    "en-reasoning", "en-squad2", "en-summary", "en-summary-dialogue", "en-wikihow",
]  # fmt: skip


def test_every_stage_2_and_3_source_has_sample_data_in_its_format(sample_corpus):
    """Catches a source of the stage mixes with no sample file (the `stage=sft` failure users saw first)."""
    for name in STAGE2_TASKS:
        records = [json.loads(line) for line in (sample_corpus / "tasks" / "train" / f"{name}.jsonl").open()]
        assert len(records) >= 100 and set(records[0]) == {"id", "input", "output", "type"}
        assert len({r["id"] for r in records}) == len(records)
    math = [json.loads(line) for line in (sample_corpus / "tasks" / "train" / "zh-reasoning.jsonl").open()]
    assert all(r["output"].endswith(f"答案为{r['output'].split('答案为')[-1]}") and "=" in r["output"] for r in math)
    en_math = [json.loads(line) for line in (sample_corpus / "tasks" / "train" / "en-reasoning.jsonl").open()]
    assert all("Therefore, the answer is" in r["output"] for r in en_math)
    assert any("Options: a )" in r["input"] for r in en_math)  # multiple-choice math, MathQA style
    sft = sample_corpus / "sft" / "train"
    assert isinstance(json.loads((sft / "code-alpaca-en" / "code_alpaca_20k.json").read_text()), list)  # Alpaca array
    mwp = [json.loads(line) for line in (sft / "mwp-zh" / "mwp_zh.jsonl").open()]
    assert all(r["instruction"] == "" and r["source"] == "mwp-zh" for r in mwp)  # BiLLa's math rows
    others = {p.name for p in (sft / "others").iterdir()}
    assert {"databricks-dolly-15k.jsonl", "alpaca_gpt4_data_zh.json", "coig_multi_round_chat.jsonl"} <= others


def test_generated_math_answers_are_right(sample_corpus):
    """Catches a generator whose rationale arithmetic or final answer is wrong (the model would learn wrong math)."""
    import re

    for line in (sample_corpus / "tasks" / "train" / "en-reasoning.jsonl").open():
        record = json.loads(line)
        for left, right in re.findall(r"(\d+(?: [+\-×÷] \d+)+) = (\d+)", record["output"]):
            expression = left.replace("×", "*").replace("÷", "//")
            assert eval(expression) == int(right), record  # noqa: S307 - digits and operators only
        final = re.search(r"the answer is (\w+)\.$", record["output"]).group(1)
        last_result = re.findall(r"= (\d+)", record["output"])[-1]
        if "Options:" in record["input"]:  # the letter names the option whose value the rationale computed
            options = dict(re.findall(r"([abcd]) \) (\d+)", record["input"]))
            assert options[final] == last_result, record
        else:
            assert final == last_result, record


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_instruction_reader_recognises_every_sft_format(tmp_path):
    """Catches a COIG / Dolly / Alpaca / BiLLa / task record read as the wrong thing or with its fields lost."""
    path = _write(
        tmp_path / "mixed.jsonl",
        "\n".join(
            json.dumps(r, ensure_ascii=False)
            for r in [
                {"instruction": " Add ", "input": "1 2", "output": "3 ", "source": "x"},
                {"instruction": "Q", "context": None, "response": "A", "category": "closed\u00a0qa"},
                {"trans_instruction": "解释", "trans_input": "你好", "trans_output": "hello"},
                {"textbox_q_instruction": "写拼音", "textbox_q_context": "", "textbox_question": "好",
                 "textbox_answer": "hǎo", "textbox_answer_analysis": "“好”读作hǎo。"},
                {"instruction": "", "conversations": [{"question": "q1", "answer": "a1"},
                                                      {"question": "q2", "answer": "a2"}]},
                {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
                {"id": "t1", "input": "3+4=?", "output": "7", "type": "math"},
            ]
        ),
    )  # fmt: skip
    records = [r.fields for r in read_records(path, "instruction", "data.sources.others.train")]
    assert records[0] == {"instruction": " Add ", "input": "1 2", "output": "3 "}  # stripped by the objective
    assert records[1] == {"instruction": "Q", "input": "", "output": "A"}
    assert records[2] == {"instruction": "解释", "input": "你好", "output": "hello"}
    assert records[3] == {"instruction": "写拼音", "input": "好", "output": "“好”读作hǎo。\nhǎo"}
    assert records[4] == {"turns": [{"human": "q1", "assistant": "a1"}, {"human": "q2", "assistant": "a2"}]}
    assert records[5] == {"turns": [{"human": "hi", "assistant": "hello"}]}
    assert records[6] == {"input": "3+4=?", "output": "7", "type": "math"}


def test_bad_multi_round_records_name_file_and_line(tmp_path):
    path = _write(tmp_path / "chat.jsonl", '{"conversations": [{"question": "q"}]}\n')
    with pytest.raises(DataFormatError, match=r"chat.jsonl:1: turn 1 of 'conversations'"):
        list(read_records(path, "instruction", "data.sources.others.train"))


@pytest.fixture(scope="module")
def sp(sample_tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(Path(sample_tokenizer_dir) / "tokenizer.model"))


@pytest.fixture
def ctx(sp):
    prompts = {"math.pre": ["Solve step by step."], "math.post": ["请一步一步地解答。"]}
    return ObjectiveContext(encode=sp.encode, bos_id=1, eos_id=2, max_len=256, prompts=prompts)


def test_sft_empty_instruction_is_left_out_and_fields_stripped(sp, ctx):
    """Catches `Human: \\n{input}` for BiLLa's math rows (instruction "") and unstripped fields."""
    record = {"instruction": "", "input": "  3+4等于几？ \n", "output": " 3+4=7。答案为7。\n"}
    example = dialogue(record, ctx, record_rng(0, "mwp-zh", 0))
    prefix, answer = sp.encode("Human: 3+4等于几？\nAssistant: "), sp.encode("3+4=7。答案为7。")
    assert example.input_ids == [1, *prefix, *answer, 2]
    assert example.labels == [IGNORE] * (1 + len(prefix)) + [*answer, 2]


def test_sft_multi_turn_labels_every_assistant_turn_only(sp, ctx):
    """Catches loss on a Human turn, a lost turn, or a COIG chat trained as one turn."""
    record = {
        "turns": [
            {"human": " q1", "assistant": "a1 "},
            {"human": "q2", "assistant": "a2"},
            {"human": "q3", "assistant": "a3"},
        ]
    }
    example = dialogue(record, ctx, record_rng(0, "others", 0))
    parts = [
        (sp.encode("Human: q1\nAssistant: "), sp.encode("a1")),
        (sp.encode("\nHuman: q2\nAssistant: "), sp.encode("a2")),
        (sp.encode("\nHuman: q3\nAssistant: "), sp.encode("a3")),
    ]
    ids, labels = [1], [IGNORE]
    for prefix, answer in parts:
        ids += [*prefix, *answer, 2]
        labels += [IGNORE] * len(prefix) + [*answer, 2]
    assert example.input_ids == ids and example.labels == labels
    assert sum(label == 2 for label in example.labels) == 3  # one EOS with loss per Assistant turn


def test_task_record_becomes_a_dialogue_with_its_prompt(sp, ctx):
    """Catches a task record in SFT trained without its task prompt or with the prompt in the Assistant turn."""
    record = {"input": "3+4=? ", "output": "3+4=7. Therefore, the answer is 7. ", "type": "math"}
    seen = set()
    for key in range(20):
        example = dialogue(record, ctx, record_rng(0, "others", key))
        n_prefix = example.labels.index(next(label for label in example.labels if label != IGNORE))
        prompt = sp.decode(example.input_ids[1:n_prefix])
        assert sp.decode(example.input_ids[n_prefix:-1]) == "3+4=7. Therefore, the answer is 7."
        seen.add(prompt)
    assert seen == {
        "Human: Solve step by step.\n3+4=?\nAssistant: ",
        "Human: 3+4=?\n请一步一步地解答。\nAssistant: ",
    }  # pre and post placement both drawn; the prompt ends in the space after "Assistant:"


SLICES = ("+data.sources.zh.slices={stage1: '0:8', stage2: '8:'}",)  # slices are an option of every data config


def test_slices_still_select_each_stages_files(cache_dir, sample_tokenizer_dir):
    """With ``slices`` set (BiLLa's per-stage file starts, as data=billa_repo has them), each stage's stream reads
    only its slice; without them both stages see every file and stage 2 continues stage 1's stream instead.

    Bug caught: the slice computed but not used by the stream (stage 2 reading stage 1's files), or slices still
    required by data=sample after streams made them unnecessary."""
    from hydra.utils import instantiate

    def datamodule(stage: str, *extra: str):
        cfg = compose_train(
            [f"stage={stage}", "trainer.max_steps=2", "scheduler.warmup_steps=1", *extra], cache=cache_dir
        )
        dm = stage_datamodule(cfg, instantiate(cfg.model.tokenizer))
        dm.prepare_data()
        dm.setup("fit")
        return dm

    for stage, first, count in (("pretrain", "00000.json", 8), ("task_mix", "00008.json", 2)):
        dm = datamodule(stage, *SLICES)
        stream = dm.train_set.sources["zh"]
        assert [Path(f).name for f in stream.files][0] == first and len(stream.files) == count
        assert {stream.record_id(q)[0] for q in range(40)} <= {Path(f).name for f in stream.files}
        dm.teardown()
    dm = datamodule("task_mix")
    assert len(dm.train_set.sources["zh"].files) == 10 and dm.train_set.sources["zh"].start == (0, 1)
    dm.teardown()


def test_a_slice_past_the_last_file_names_the_key(cache_dir, sample_tokenizer_dir):
    from hydra.utils import instantiate

    from billa.config import ConfigError

    cfg = compose_train(["stage=task_mix", "+data.sources.zh.slices={stage2: '40:'}"], cache=cache_dir)
    datamodule = stage_datamodule(cfg, instantiate(cfg.model.tokenizer))
    datamodule.build()
    with pytest.raises(ConfigError, match=r"data.sources.zh.slices.stage2='40:' selects no file.*has 10 files"):
        datamodule.files("zh", "train")
