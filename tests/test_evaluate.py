"""Evaluation: loaders on the distributed formats, perplexity by hand, lm-eval log-likelihoods, letters, answers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from billa.data.readers import DataFormatError
from billa.evaluate.answers import answers, category_name, load_questions
from billa.evaluate.lm import EvalLM, find_export, load_lm
from billa.evaluate.multiple_choice import (
    FIXTURES,
    extract_letter,
    load_items,
    loglik,
    multiple_choice,
    strip_letter_prefixes,
)
from billa.evaluate.ppl import perplexity

from .evaluate_helpers import make_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, sample_tokenizer_dir):
    return make_export(sample_tokenizer_dir, tmp_path_factory.mktemp("eval") / "outputs" / "pretrain" / "d1" / "hf")


@pytest.fixture(scope="module")
def lm(export_dir) -> EvalLM:
    return load_lm(export_dir, batch_size=4)


# ---- loaders ------------------------------------------------------------------------------------------------------
def test_logiqa2_en_and_zh_as_distributed():
    """Catches: zh items dropped for lacking `id`, or "A." prefixes kept (the lettered prompt would read "A. A.xx")."""
    en = load_items("fixtures://logiqa2-en-test.txt", "logiqa2", "t")
    zh = load_items("fixtures://logiqa2-zh-test.txt", "logiqa2", "t")
    assert [i.id for i in en] == ["9001", "9002", "9003", "9004", "9005", "9006"]
    assert [i.id for i in zh] == ["1", "2", "3", "4", "5", "6"]
    raw = [json.loads(line) for line in (FIXTURES / "logiqa2-zh-test.txt").read_text().splitlines()]
    assert "id" not in raw[0] and raw[0]["options"][0].startswith("A.")
    assert zh[0].options == (
        "小王参加了数学竞赛。",
        "小王是辅导班的老师。",
        "小王没有参加数学竞赛。",
        "所有参加辅导班的学生都参加了竞赛。",
    )
    assert zh[0].answer == 2 and en[1].answer == 3
    assert all(len(i.options) == 4 for i in en + zh)
    assert zh[0].where.endswith("logiqa2-zh-test.txt:1")


def test_letter_prefixes_are_stripped_only_when_all_options_carry_them_in_order():
    assert strip_letter_prefixes(["A.x", "B、y", "C) z", "D．w"]) == ["x", "y", "z", "w"]
    assert strip_letter_prefixes(["A good plan", "B-movies", "C.", "D"]) == ["A good plan", "B-movies", "C.", "D"]
    assert strip_letter_prefixes(["B.x", "A.y"]) == ["B.x", "A.y"]  # not in order: the text may mean it


def test_c3_two_three_and_four_choice_items():
    """Catches: a loader assuming 4 choices (C3 has 2- and 3-choice questions) or answers as indices."""
    d = load_items("fixtures://c3-d-dev.json", "c3", "t")
    m = load_items("fixtures://c3-m-dev.json", "c3", "t")
    assert sorted({len(i.options) for i in d + m}) == [2, 3, 4]
    two = next(i for i in d if i.id == "m0-2-1")
    assert two.options == ("打折", "不打折") and two.answer == 0
    assert next(i for i in d if i.id == "m0-2-2").answer == 1  # "两件"
    assert next(i for i in d if i.id == "m0-4-1").options[2] == "游泳"
    assert d[0].passage == "男：你今天怎么来得这么早？\n女：我坐的是第一班地铁，路上一点儿也不堵。"
    assert len(d) == 5 and len(m) == 5


def test_bad_items_name_file_and_line(tmp_path):
    bad = tmp_path / "c3-d-test.json"
    bad.write_text(json.dumps([[["p"], [{"question": "q", "choice": ["a", "b"], "answer": "c"}], "x"]]))
    with pytest.raises(DataFormatError, match=r"c3-d-test.json:1\.q1: answer 'c' is not one of the choices"):
        load_items(str(bad), "c3", "task.c3.files.d")
    zh = tmp_path / "test.txt"
    zh.write_text(json.dumps({"answer": 1, "text": "t", "question": "q", "options": ["A.a", "B.b"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"test.txt:1: LogiQA 2.0 record lacks \['id/example_id'\]"):
        load_items(str(zh), "logiqa2", "task.logiqa2.files.zh")
    zh.write_text('{"example_id": 1, "answer": 7, "text": "t", "question": "q", "options": ["a", "b"]}\n')
    with pytest.raises(DataFormatError, match=r"test.txt:1: answer=7"):
        load_items(str(zh), "logiqa2", "x")


def test_question_file_keeps_the_nbsp_category():
    """Catches: categories compared raw, so "closed\\xa0qa" (as distributed) and "closed qa" split one category."""
    questions = load_questions("fixtures://questions.jsonl")
    assert len(questions) == 8
    closed = [q for q in questions if q["question_id"] == 7][0]
    assert closed["category"] == "closed\xa0qa"
    assert category_name(closed["category"]) == category_name("closed qa") == "closed qa"


# ---- perplexity ---------------------------------------------------------------------------------------------------
def _hand_nll(model, ids: list[int], first_scored: int) -> tuple[float, int]:
    """NLL (nats) of ids[first_scored:] given everything before, from one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    nll = F.cross_entropy(logits[first_scored - 1 : -1], torch.tensor(ids[first_scored:]), reduction="sum")
    return float(nll), len(ids) - first_scored


def test_perplexity_equals_exp_mean_nll_by_hand(lm, tmp_path):
    """Catches: per-document averaging, an off-by-one shift, BOS scored, the cut ignored or drawn from another RNG."""
    from billa.data.objectives import record_rng

    texts = ["The weather is nice today. We go to the park.", "我们今天去公园散步，天气很好。", "Short one."]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": "Pile-CC"}}) + "\n" for t in texts))
    result = perplexity(lm, {"mix": {"path": str(path), "format": "pile"}}, seed=7)
    total = {"causal_lm": [0.0, 0, 0], "conditional_generation": [0.0, 0]}
    for line, text in enumerate(texts, start=1):
        ids = [lm.tokenizer.bos_token_id, *lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
        ids.append(lm.tokenizer.eos_token_id)
        nll, n = _hand_nll(lm.model, ids, 1)
        total["causal_lm"][0] += nll
        total["causal_lm"][1] += n
        total["causal_lm"][2] += len(text)
        length = len(ids)  # the cut: uniform in [int(0.2L)+1, int(0.7L)], from the record's own RNG
        low = int(0.2 * length) + 1
        pos = min(record_rng(7, "mix", f"{path}:{line}").randint(low, max(low, int(0.7 * length))), length - 1)
        nll, n = _hand_nll(lm.model, ids, pos)
        total["conditional_generation"][0] += nll
        total["conditional_generation"][1] += n
    m = result.metrics
    assert m["mix/causal_lm/ppl"] == pytest.approx(math.exp(total["causal_lm"][0] / total["causal_lm"][1]), rel=1e-5)
    assert m["mix/causal_lm/bits_per_char"] == pytest.approx(
        total["causal_lm"][0] / math.log(2) / total["causal_lm"][2], rel=1e-5
    )
    cond = total["conditional_generation"]
    assert m["mix/conditional_generation/ppl"] == pytest.approx(math.exp(cond[0] / cond[1]), rel=1e-5)
    assert m["all/causal_lm/ppl"] == m["mix/causal_lm/ppl"]


def test_perplexity_is_independent_of_batch_size_and_reports_languages(export_dir, sample_corpus):
    sources = {
        "wudao": {"path": str(sample_corpus / "wudao" / "val.json"), "format": "wudao", "lang": "zh"},
        "pile": {"path": str(sample_corpus / "pile" / "val.jsonl"), "format": "pile", "lang": "en"},
    }
    one = perplexity(load_lm(export_dir, batch_size=1), sources, max_records=6).metrics
    many = perplexity(load_lm(export_dir, batch_size=5), sources, max_records=6).metrics
    assert one.keys() == many.keys()
    for key in one:
        assert one[key] == pytest.approx(many[key], rel=1e-5), key
    assert {"lang/zh/conditional_generation/bits_per_char", "lang/en/causal_lm/ppl"} <= one.keys()
    assert one["lang/zh/causal_lm/ppl"] == one["wudao/causal_lm/ppl"]


# ---- log-likelihood multiple choice -------------------------------------------------------------------------------
def _reference_loglik(lm: EvalLM, context: str, option: str) -> float:
    """lm-evaluation-harness, one request at a time: encode context + " " + option whole, score past len(context)."""
    tok = lm.tokenizer
    whole = [tok.bos_token_id, *tok(context + " " + option, add_special_tokens=False)["input_ids"]]
    ctx = [tok.bos_token_id, *tok(context, add_special_tokens=False)["input_ids"]]
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = lm.model(torch.tensor([whole[:-1]])).logits[0]
    logprobs = F.log_softmax(logits[-len(cont) :], dim=-1)
    return float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum())


def test_loglik_matches_one_at_a_time_and_any_batch_size(export_dir):
    """Catches: padding leaking into scores, wrong slice of continuation logits, order lost after length sorting."""
    items = load_items("fixtures://c3-d-dev.json", "c3", "t") + load_items(
        "fixtures://logiqa2-en-test.txt", "logiqa2", "t"
    )
    prompt = "{passage}\n问题：{question}\n答案："
    runs = {bs: loglik(load_lm(export_dir, batch_size=bs), items, prompt, " ", None) for bs in (1, 3, 16)}
    plain = load_lm(export_dir, batch_size=16)
    plain.share_prefix = False  # lm-evaluation-harness's layout: one row per (prompt, option), no shared cache
    runs["plain"] = loglik(plain, items, prompt, " ", None)
    ref_lm = load_lm(export_dir, batch_size=1)
    for k, item in enumerate(items):
        context = prompt.format(passage=item.passage, question=item.question, options="")
        reference = [_reference_loglik(ref_lm, context, option) for option in item.options]
        for bs, scored in runs.items():
            assert scored[k][0] == pytest.approx(reference, abs=1e-4), (bs, item.id)
            assert scored[k][1:] == runs[1][k][1:]


def test_continuation_tokens_come_from_the_joint_encoding(lm):
    """Catches: encoding " " + option on its own, which adds a word-boundary piece and changes every score."""
    context, option = "Question: where?\nAnswer:", "To the lake."
    ctx, cont = lm.encode_pair(context, " " + option)
    whole = lm.encode(context + " " + option)
    assert ctx + cont == whole
    assert cont != lm.encode(" " + option, bos=False)  # the trap the joint encoding avoids
    assert lm.encode_pair(context + " ", option) == (ctx, cont)  # a trailing space moves to the continuation


def test_long_prompts_are_left_truncated_as_lm_eval_does(export_dir):
    """Catches: a prompt longer than the model's context crashing or being cut from the wrong end."""
    lm = load_lm(export_dir, batch_size=4, max_length=24)
    context, option = "A long passage about the weather. " * 12 + "Answer:", " To the lake."
    ctx, cont = lm.encode_pair(context, option)
    inputs = (ctx + cont)[-(24 + 1) :][:-1]  # lm-evaluation-harness keeps the last max_length tokens
    with torch.no_grad():
        logits = lm.model(torch.tensor([inputs])).logits[0]
    reference = float(F.log_softmax(logits[-len(cont) :], dim=-1).gather(1, torch.tensor(cont)[:, None]).sum())
    assert len(ctx) > 24
    assert lm.loglikelihood([(context, option)])[0][0] == pytest.approx(reference, abs=1e-4)


class _FixedScores:
    """A stand-in for EvalLM with known log-likelihoods (tests the acc / acc_norm arithmetic only)."""

    def __init__(self, scores):
        self.scores = scores

    def loglikelihood(self, requests, desc=None):
        return [(s, False) for s in self.scores[: len(requests)]]


def test_acc_norm_divides_by_option_characters():
    """Catches: normalising by tokens or by the delimiter-inclusive string instead of the option's characters."""
    from billa.evaluate.multiple_choice import MCItem

    item = MCItem("1", "p", "q", ("ab", "abcdefgh"), 1, "x")
    ((lls, pred, pred_norm),) = loglik(_FixedScores([-2.0, -6.0]), [item], "{question}", " ", None)
    assert lls == [-2.0, -6.0] and pred == 0 and pred_norm == 1  # -2/2 = -1 < -6/8 = -0.75
    item = MCItem("1", "p", "q", ("ab", "abcde"), 1, "x")
    assert loglik(_FixedScores([-2.0, -6.0]), [item], "{question}", " ", None)[0][2] == 0  # -1 > -1.2


# ---- generative ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "output,n,expected",
    [
        ("B", 4, 1),
        ("答案是C。", 4, 2),
        ("Answer: D", 4, 3),  # the "A" of "Answer" is part of a word
        ("(A) because it follows", 4, 0),
        ("选项Ｂ正确", 4, 1),  # full-width letter
        ("\n\nB. 小王没有参加", 4, 1),
        ("C", 2, None),  # beyond a 2-choice item's options
        ("我不知道", 4, None),
        ("E", 4, None),
        ("BC", 4, None),  # not a standalone letter
        ("I think D, not A", 4, 3),
    ],
)
def test_generative_letter_extraction(output, n, expected):
    assert extract_letter(output, n) == expected


def test_generative_and_loglik_do_not_depend_on_batch_size(export_dir):
    """Catches: left padding or position ids wrong in batched generation (answers change with the batch)."""
    settings = {
        "instruction": "材料：{passage}\n问题：{question}\n{options}",
        "template": "dialogue",
        "max_new_tokens": 6,
    }
    files = {"d": "fixtures://c3-d-dev.json"}
    ll = {"prompt": "{passage}\n问题：{question}\n答案：", "delimiter": " "}
    results = [
        multiple_choice(load_lm(export_dir, batch_size=bs), "c3", files, ["generative", "loglik"], settings, ll)
        for bs in (1, 5)
    ]
    one, five = ([(d["generated"], d["loglik_pred"]) for d in r.details["items"]] for r in results)
    assert one == five
    assert results[0].metrics == results[1].metrics
    assert len({g for g, _ in one}) > 1  # the model really generated different things


# ---- answers ------------------------------------------------------------------------------------------------------
def test_answers_format_and_resume_after_an_interrupted_write(lm, tmp_path):
    """Catches: a resumed run re-answering, duplicating or losing questions, or sampling them differently."""
    kwargs = dict(question_file="fixtures://questions.jsonl", max_new_tokens=8, chunk_size=3, seed=1, model_id="m")
    answers(lm, output_dir=str(tmp_path / "full"), **kwargs)
    full = (tmp_path / "full" / "answers.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(full) == 8
    first = json.loads(full[0])
    assert set(first) == {"question_id", "text", "answer_id", "model_id", "metadata"}
    assert first["metadata"]["temperature"] == 0.7 and first["model_id"] == "m" and len(first["answer_id"]) == 22
    assert [json.loads(line)["question_id"] for line in full] == list(range(1, 9))
    # interrupted in the middle of writing chunk 2 (questions 4-6): two full lines and half of the third
    part = tmp_path / "part" / "answers.jsonl"
    part.parent.mkdir()
    part.write_text("\n".join(full[:5]) + "\n" + full[5][:20], encoding="utf-8")
    result = answers(lm, output_dir=str(tmp_path / "part"), **kwargs)
    assert result.metrics["answered_before"] == 3  # chunk 1 kept, the partial chunk 2 redone whole
    assert part.read_text(encoding="utf-8").splitlines() == full


def test_missing_export_names_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_path is not set and no export matches"):
        find_export(None, None, str(tmp_path / "outputs/*/*/hf"))
    with pytest.raises(FileNotFoundError, match=r"model_path=.*not a Hugging Face model directory"):
        find_export(str(tmp_path), None, "x")
