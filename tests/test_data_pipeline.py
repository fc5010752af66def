"""Readers in every format, tokenise-once cache (reuse, resume after a kill), exact mixing, sharding and resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from billa.data.cache import ObjectiveSettings, tokenize_source
from billa.data.datamodule import DEFAULT_PROMPTS_DIR, BillaDataModule
from billa.data.mixing import MixedDataset, StreamSampler
from billa.data.objectives import Example
from billa.data.readers import DataFormatError, ReadStats, read_records

from .helpers import tiny_llama

PILE = [{"text": f"document number {i}", "meta": {"pile_set_name": "Pile-CC" if i % 3 else "Github"}} for i in range(9)]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _jsonl_parts(tmp_path: Path, files: int, lines: int, text: str) -> Path:
    """``tmp_path/data/part-{i}.jsonl`` for i < ``files``, each of ``lines`` records ``text.format(i=i, j=j)``."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(files):
        _jsonl(data / f"part-{i}.jsonl", [{"text": text.format(i=i, j=j)} for j in range(lines)])
    return data


def test_every_file_format_reads_the_same_records(tmp_path):
    texts = [r["text"] for r in PILE]
    _jsonl(tmp_path / "a.jsonl", PILE)
    (tmp_path / "b.json").write_text(json.dumps(PILE), encoding="utf-8")
    with pa.CompressedOutputStream(str(tmp_path / "c.jsonl.zst"), "zstd") as out:
        out.write("".join(json.dumps(r) + "\n" for r in PILE).encode())
    pq.write_table(pa.Table.from_pylist([{"text": r["text"]} for r in PILE]), tmp_path / "d.parquet")
    for name in ("a.jsonl", "b.json", "c.jsonl.zst", "d.parquet"):
        records = list(read_records(tmp_path / name, "pile", "data.sources.en.train"))
        assert [r.fields["text"] for r in records] == texts, name
        assert [r.line for r in records] == list(range(1, 10))
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        _jsonl(shards / f"part-{i}.jsonl", PILE[3 * i : 3 * i + 3])
    assert [r.fields["text"] for r in read_records(shards, "pile", "x")] == texts  # a directory of shards
    assert [r.fields["text"] for r in read_records(shards / "part-*.jsonl", "pile", "x")] == texts  # a glob
    stats = ReadStats()
    kept = list(read_records(tmp_path / "a.jsonl", "pile", "x", stats, pile_sets=["Pile-CC"]))
    assert len(kept) == 6 and stats.filtered == 3  # BiLLa's PILE filter is counted, not silent


def test_translation_instruction_and_task_formats(tmp_path):
    _jsonl(tmp_path / "wmt.jsonl", [{"translation": {"en": "Hi", "zh": "你好"}}])
    assert next(read_records(tmp_path / "wmt.jsonl", "translation", "x")).fields == {"en": "Hi", "zh": "你好"}
    _jsonl(tmp_path / "dolly.jsonl", [{"instruction": "Sum", "context": "1,2", "response": "3", "category": "qa"}])
    fields = next(read_records(tmp_path / "dolly.jsonl", "instruction", "x")).fields
    assert fields == {"instruction": "Sum", "input": "1,2", "output": "3"}
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Hi", "input": "", "output": "Hello"}]))
    assert next(read_records(tmp_path / "alpaca.json", "instruction", "x")).fields["output"] == "Hello"
    _jsonl(tmp_path / "task.jsonl", [{"id": 1, "input": "1+1", "output": "2"}])  # type may be missing
    assert next(read_records(tmp_path / "task.jsonl", "task", "x")).fields == {
        "input": "1+1",
        "output": "2",
        "type": None,
    }


def test_malformed_records_raise_or_are_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n{"no_text": 1}\n{"text": "ok too"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"{path}:2: not valid JSON"):
        list(read_records(path, "pile", "x"))
    stats = ReadStats()
    records = list(read_records(path, "pile", "x", stats, on_error="skip"))
    assert [r.line for r in records] == [1, 4]
    assert stats.skipped == 2 and stats.read == 2
    assert stats.skipped_examples[0].startswith(f"{path}:2:") and stats.skipped_examples[1].startswith(f"{path}:3:")


def _settings(source="en", max_len=64):
    return ObjectiveSettings(source, "pile", "causal_lm", max_len, 0, False)


def test_tokenise_once_reuses_and_resumes(tmp_path, sample_tokenizer_dir):
    data = _jsonl_parts(tmp_path, 4, 5, "shard {i} line {j} 你好")
    cache = tmp_path / "cache"
    args = (str(data / "*.jsonl"), _settings(), sample_tokenizer_dir, str(DEFAULT_PROMPTS_DIR), cache)
    first, stats = tokenize_source(*args, num_proc=2)
    assert len(first) == 20 and stats["reused_shards"] == 0 and stats["files"] == 4
    again, stats = tokenize_source(*args)
    rows = lambda source: source.dataset[:]  # noqa: E731 - every stored variant of every record
    assert stats["reused_shards"] == 4 and rows(again) == rows(first)
    # a pass killed while writing part-2: its shard never got its completion marker (only a .tmp directory)
    shards = sorted(p for p in next((cache / "en").iterdir()).iterdir() if p.is_dir())
    victim = next(
        p for p in shards if json.loads((p / "billa_shard.json").read_text())["file"].endswith("part-2.jsonl")
    )
    untouched = {p: (p / "billa_shard.json").stat().st_mtime_ns for p in shards if p != victim}
    victim.rename(victim.with_name(victim.name + ".tmp999"))
    resumed, stats = tokenize_source(*args)
    assert stats["reused_shards"] == 3  # only the unfinished file is tokenised again
    assert rows(resumed) == rows(first)
    assert all((p / "billa_shard.json").stat().st_mtime_ns == t for p, t in untouched.items())
    # a changed file or changed objective settings get new shards
    _jsonl(data / "part-0.jsonl", [{"text": "changed"}])
    _, stats = tokenize_source(*args)
    assert stats["reused_shards"] == 3 and stats["examples"] == 16
    _, stats = tokenize_source(
        str(data / "*.jsonl"), _settings(max_len=32), sample_tokenizer_dir, str(DEFAULT_PROMPTS_DIR), cache
    )
    assert stats["reused_shards"] == 0


def _examples(tag: int, n: int) -> list[Example]:
    return [Example([tag, i], [tag, i]) for i in range(n)]


def test_mix_is_exact_in_every_micro_batch_across_ranks():
    weights = {"zh": 4, "en": 4, "translate": 2, **{f"task{i}": 1 for i in range(10)}}  # stage 2: 10 + 10
    sources = {name: _examples(k, 7 + k) for k, name in enumerate(weights)}
    data = MixedDataset(sources, weights, num_samples=20 * 2 * 6, seed=0)
    for rank in range(2):
        loader = DataLoader(
            data,
            batch_size=20,
            sampler=StreamSampler(len(data), rank, 2, block=20),
            collate_fn=lambda items: [item["source"] for item in items],
        )
        for batch in loader:
            counts = Counter(batch)
            assert counts == Counter(weights)
            lm = counts["zh"] + counts["en"] + counts["translate"]
            assert lm == 10 and len(batch) - lm == 10


def test_mix_is_exact_in_every_global_batch_when_the_micro_batch_is_not_a_multiple_of_the_cycle():
    """Cycle 10 (4:4:2), micro batch 2 x 2 ranks x accumulation 5 = global batch 20: no micro batch can hold the
    ratio, but the 10 micro batches of every optimizer step together hold exactly 8 zh, 8 en, 4 translate."""
    weights = {"zh": 4, "en": 4, "translate": 2}
    sources = {name: _examples(k, 11 + k) for k, name in enumerate(weights)}
    data = MixedDataset(sources, weights, num_samples=20 * 6, seed=0)
    per_rank = []
    for rank in range(2):
        loader = DataLoader(data, batch_size=2, sampler=StreamSampler(len(data), rank, 2, block=2), collate_fn=list)
        per_rank.append([[item["source"] for item in batch] for batch in loader])
    assert len(per_rank[0]) == 6 * 5
    for step in range(6):
        counts = Counter(s for rank in per_rank for batch in rank[5 * step : 5 * step + 5] for s in batch)
        assert counts == {"zh": 8, "en": 8, "translate": 4}, (step, counts)


class _Indices(Dataset):
    def __len__(self):
        return 200

    def __getitem__(self, index):
        return index


def test_ranks_and_workers_get_disjoint_complete_shares():
    seen = []
    for rank in range(2):
        sampler = StreamSampler(200, rank, 2, block=4)
        loader = DataLoader(_Indices(), batch_size=4, sampler=sampler, num_workers=2)
        rank_indices = [int(i) for batch in loader for i in batch]
        assert len(rank_indices) == len(sampler) == 100
        seen.extend(rank_indices)
    assert sorted(seen) == list(range(200))  # disjoint and complete


@pytest.fixture(scope="module")
def datamodule_factory(sample_corpus, sample_tokenizer_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("tokenized")
    sources = {
        "zh": {"kind": "text", "format": "wudao", "train": str(sample_corpus / "wudao/train"), "val": None},
        "translate": {
            "kind": "translation",
            "format": "translation",
            "train": str(sample_corpus / "translation/train"),
            "val": None,
        },
    }

    def make(resume_samples: int = 0, num_workers: int = 0, trainer=None) -> BillaDataModule:
        micro, global_batch = (3, 12) if trainer is not None else (6, 6)  # with a trainer: 2 ranks x 3 x 2 acc.
        dm = BillaDataModule(
            sources,
            {"zh": 2, "translate": 1},
            {"text": "conditional_generation", "translation": "translation"},
            sample_tokenizer_dir,
            max_seq_length=64,
            micro_batch_size=micro,
            global_batch_size=global_batch,
            num_samples=global_batch * (10 if trainer is not None else 20),
            seed=3,
            token_cache_dir=str(cache),
            num_workers=num_workers,
        )
        dm.trainer = trainer
        dm.prepare_data()
        dm.setup("fit")
        if trainer is None:
            dm.load_state_dict({"consumed_samples": resume_samples, "seed": 3})
        return dm

    return make


def test_resume_gives_identical_batches(datamodule_factory):
    """Resume through the checkpoint path: ``state_dict()`` after step k, ``load_state_dict()`` in a new datamodule.

    2 ranks x micro batch 3 x accumulation 2 = global batch 12: after k optimizer steps each rank resumes at its
    micro batch 2k. Catches a resume position that forgets accumulation or ranks (k x micro x ranks), and a
    ``state_dict`` that does not follow the trainer's step.
    """
    steps_done, accumulation = 4, 2
    for rank in range(2):
        trainer = SimpleNamespace(global_step=0, global_rank=rank, world_size=2, num_nodes=1)
        full = list(datamodule_factory(trainer=trainer).train_dataloader())
        assert len(full) == 10 * accumulation  # 10 optimizer steps of 2 micro batches per rank
        trainer.global_step = steps_done  # what a checkpoint written after step 4 records
        state = datamodule_factory(trainer=trainer).state_dict()
        resumed_dm = datamodule_factory(
            trainer=SimpleNamespace(global_step=steps_done, global_rank=rank, world_size=2, num_nodes=1)
        )
        resumed_dm.load_state_dict(state)
        resumed = list(resumed_dm.train_dataloader())
        assert len(resumed) == len(full) - steps_done * accumulation
        for a, b in zip(full[steps_done * accumulation :], resumed, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            assert a["source"] == b["source"] and a["step_label_tokens"] == b["step_label_tokens"]


def test_every_micro_batch_knows_the_label_tokens_of_its_whole_step(datamodule_factory):
    """``step_label_tokens`` of a micro batch = label tokens of all micro batches of its step on all ranks.

    The loss of each micro batch is divided by it (a token mean over the global batch). Catches a total over one
    rank's or one micro batch's samples, or over a misaligned window of the stream.
    """
    loaders = [
        list(
            datamodule_factory(
                trainer=SimpleNamespace(global_step=0, global_rank=r, world_size=2, num_nodes=1)
            ).train_dataloader()
        )
        for r in range(2)
    ]
    for step in range(10):
        micro = [batch for rank in loaders for batch in rank[2 * step : 2 * step + 2]]  # 2 ranks x 2 accumulation
        counted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        assert {b["step_label_tokens"] for b in micro} == {counted}
        assert sum(len(b["source"]) for b in micro) == 12


def test_packing_matches_separate_samples():
    from billa.data.collate import PackCollator, PadCollator

    model = tiny_llama(100, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    items = []
    for n in (5, 9, 3, 12, 7):
        ids = [1, *torch.randint(3, 100, (n - 1,), generator=g).tolist()]
        items.append({"input_ids": ids, "labels": [-100, *ids[1:]], "source": "zh"})
    packed = PackCollator(pad_id=0, max_len=16)(items)
    assert packed["input_ids"].shape[0] < len(items)  # fewer rows than samples
    assert packed["attention_mask"].shape == (
        packed["input_ids"].shape[0],
        1,
        packed["input_ids"].shape[1],
        packed["input_ids"].shape[1],
    )
    assert sorted(packed["sample_tokens"]) == [3, 5, 7, 9, 12]
    logits = model(
        input_ids=packed["input_ids"], attention_mask=packed["attention_mask"], position_ids=packed["position_ids"]
    ).logits
    # every sample's logits in its packed row equal its logits alone (no attention across samples)
    for item in items:
        alone = model(input_ids=torch.tensor([item["input_ids"]])).logits[0]
        n = len(item["input_ids"])
        found = False
        for row in range(packed["input_ids"].shape[0]):
            ids = packed["input_ids"][row].tolist()
            for start in range(len(ids) - n + 1):
                if ids[start : start + n] == item["input_ids"] and packed["position_ids"][row, start] == 0:
                    torch.testing.assert_close(logits[row, start : start + n], alone, atol=1e-5, rtol=1e-5)
                    found = True
        assert found
    # the loss-bearing tokens are those of the padded layout, minus nothing (first labels are -100 already)
    padded = PadCollator(pad_id=0)(items)
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())


def test_probability_mixing_follows_the_weights_and_is_a_function_of_the_index():
    sources = {"a": _examples(0, 50), "b": _examples(1, 30)}
    data = MixedDataset(sources, {"a": 0.75, "b": 0.25}, num_samples=4000, seed=0, mode="probability")
    counts = Counter(data[i]["source"] for i in range(4000))
    assert counts["a"] / 4000 == pytest.approx(0.75, abs=0.03)
    again = MixedDataset(sources, {"a": 0.75, "b": 0.25}, num_samples=4000, seed=0, mode="probability")
    assert [again.locate(i) for i in range(0, 4000, 37)] == [data.locate(i) for i in range(0, 4000, 37)]
    b = [data.locate(i)[1] for i in range(4000) if data.locate(i)[0] == "b"]
    assert sorted(b[:30]) == list(range(30))  # each source still walks a permutation before repeating


KILL_SCRIPT = """
import sys, time
import billa.data.tokenise as tokenise
original = tokenise.tokenize_piece
def slow(*args):
    result = original(*args)
    time.sleep(0.5)  # room for the test to kill the pass between two files
    return result
tokenise.tokenize_piece = slow
from billa.data.cache import ObjectiveSettings, tokenize_source
tokenize_source(sys.argv[1], ObjectiveSettings("en", "pile", "causal_lm", 64, 0, False), sys.argv[2], sys.argv[3],
                sys.argv[4], num_proc=1)
"""


def test_a_killed_tokenisation_pass_resumes_without_redoing_finished_shards(tmp_path, sample_tokenizer_dir):
    import signal
    import subprocess
    import sys
    import time

    data = _jsonl_parts(tmp_path, 8, 50, "file {i} line {j}")
    cache = tmp_path / "cache"
    args = [str(data / "*.jsonl"), sample_tokenizer_dir, str(DEFAULT_PROMPTS_DIR), str(cache)]
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = []
    while time.time() < deadline and len(done) < 3:
        try:
            done = list(cache.rglob("billa_shard.json"))
        except FileNotFoundError:  # a temporary directory renamed into place while the walk was inside it
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent: p.stat().st_mtime_ns for p in cache.rglob("billa_shard.json")}
    assert 3 <= len(finished) < 8, len(finished)  # killed mid-pass
    resumed, stats = tokenize_source(args[0], _settings(), sample_tokenizer_dir, args[2], cache)
    assert stats["reused_shards"] == len(finished)
    assert all((shard / "billa_shard.json").stat().st_mtime_ns == t for shard, t in finished.items())
    fresh, _ = tokenize_source(args[0], _settings(), sample_tokenizer_dir, args[2], tmp_path / "fresh")
    assert resumed.dataset[:] == fresh.dataset[:]


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"hf://billa/does-not-exist@train: cannot stream .* local files"):
        list(read_records("hf://billa/does-not-exist@train", "pile", "data.sources.en.train"))


def test_worker_processes_see_the_same_stream(datamodule_factory):
    """Arrow-backed sources survive pickling into dataloader workers; two workers give the same batches, in order."""
    single = list(datamodule_factory().train_dataloader())
    workers = list(datamodule_factory(num_workers=2).train_dataloader())
    assert len(single) == len(workers) == 20
    for a, b in zip(single, workers, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["source"] == b["source"]
