"""Stream sources: file order, tokenised while training into compact pieces, continued by the next stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from billa.config import ConfigError
from billa.data.cache import ObjectiveSettings
from billa.data.datamodule import BillaDataModule
from billa.data.objectives import ObjectiveContext, load_prompts, variants
from billa.data.readers import read_records
from billa.data.stream import StreamSource, tokenise_file
from billa.data.tokenise import _Worker, tokenizer_spec
from billa.tokenizer.load import load_tokenizer

PROMPTS = Path(__file__).resolve().parents[1] / "conf" / "prompts"
MAX_LEN = 64


def _zst_copy(src: Path, out: Path) -> Path:
    with open(src, "rb") as raw, pa.output_stream(str(out), compression="zstd") as sink:
        sink.write(raw.read())
    return out


@pytest.fixture(scope="module")
def worker(sample_tokenizer_dir):
    prompts = load_prompts(PROMPTS)
    return _Worker(tokenizer_spec(load_tokenizer(sample_tokenizer_dir)), prompts), prompts


def _settings(name, fmt, objective, extra_newline=False, max_len=MAX_LEN):
    return ObjectiveSettings(name, fmt, objective, max_len, 5, extra_newline)


CASES = [  # source, format, objective, stage-2 translation newline, files (relative to the sample corpus)
    ("zh", "wudao", "conditional_generation", False, ["wudao/train/00000.json", "wudao/train/00001.json"]),
    ("en", "pile", "causal_lm", False, ["pile/train/00000.jsonl", "zst:pile/train/00001.jsonl"]),
    ("translate", "translation", "translation", False, ["translation/train/00000.jsonl"]),
    ("translate", "translation", "translation", True, ["zst:translation/train/00001.jsonl"]),
]


@pytest.mark.parametrize("case", CASES, ids=["wudao", "pile-zst", "translation", "translation-stage2-zst"])
def test_stream_rows_are_exactly_the_objectives_examples(case, sample_corpus, worker, tmp_path):
    """Every row read back from the compact pieces equals what ``objectives.variants`` makes of the record: the same
    variants (ids, labels after the prompt, truncation to max_len) with the same probabilities, every usable record
    once, in file and line order, across piece boundaries and from .jsonl.zst.

    Bug caught: a label offset off by one at the prompt, a translation prompt part taken from the wrong record or
    direction, a record lost or repeated at a piece boundary, uint16 ids that wrap, a zst shard read out of order."""
    name, fmt, objective, newline, rel = case
    files = []
    for entry in rel:
        src = sample_corpus / entry.removeprefix("zst:")
        files.append(str(_zst_copy(src, tmp_path / (src.name + ".zst")) if entry.startswith("zst:") else src))
    work, prompts = worker
    settings = _settings(name, fmt, objective, newline)
    root = tmp_path / "stream"
    source = StreamSource(name, files, settings, root, (0, 1), prompts, work.bos_id, work.eos_id)
    for index, path in enumerate(files):
        tokenise_file(path, settings, str(source.file_dir(index)), piece_bytes=1500, worker=work)
    pieces = max(len(list(source.file_dir(i).glob("*.arrow"))) for i in range(len(files)))
    assert pieces > 1 or fmt == "wudao"  # line files split into several pieces; a JSON array is one
    ctx = ObjectiveContext(
        encode=lambda text: work.encode([text])[0],
        bos_id=work.bos_id,
        eos_id=work.eos_id,
        max_len=MAX_LEN,
        prompts=prompts,
        translation_extra_newline=newline,
    )
    expected = []
    for path in files:
        for record in read_records(path, fmt, "test"):
            found = variants(objective, record.fields, ctx)
            if found is not None:
                expected.append((Path(path).name, record.line, found))
    for q, (file_name, line, want) in enumerate(expected):
        assert source.record_id(q) == (file_name, line, 0)
        epoch, file_index, piece, row = source.locate(q)
        got = source.variants(source._table(file_index, piece), row, source._markers[(file_index, piece)])
        assert [(e.input_ids, e.labels) for e in got.examples] == [(e.input_ids, e.labels) for e in want.examples]
        assert got.weights == pytest.approx(want.weights) and got.cut == want.cut
    assert source.record_id(len(expected)) == (Path(files[0]).name, expected[0][1], 1)  # then the next epoch


def test_pieces_take_at_most_2_5_bytes_a_token(sample_corpus, worker, tmp_path):
    """The cache holds LM text and translation at <= 2.5 bytes per token of the examples drawn from it (uint16 ids,
    no label list, a translation record's texts once).

    Bug caught: int32 or int64 ids, labels stored beside the ids, or every translation prompt variant stored whole
    (~40 copies of a record), which made the cache 8 bytes a token times the variants."""
    work, prompts = worker
    for name, fmt, objective, rel in (
        ("en", "pile", "conditional_generation", "pile/train/00000.jsonl"),
        ("translate", "translation", "translation", "translation/train/00000.jsonl"),
    ):
        settings = _settings(name, fmt, objective, max_len=1024)
        source = StreamSource(
            name, [str(sample_corpus / rel)], settings, tmp_path / name, (0, 1), prompts, work.bos_id, work.eos_id
        )
        tokenise_file(str(sample_corpus / rel), settings, str(source.file_dir(0)), worker=work)
        cache_bytes = sum(p.stat().st_size for p in source.file_dir(0).glob("*.arrow"))
        rows = json.loads((source.file_dir(0) / "00000.json").read_text())["rows"]
        tokens = sum(len(source.at(q)["input_ids"]) for q in range(rows))
        assert cache_bytes / tokens <= 2.5, (name, cache_bytes, tokens)


# ---- stage 2 continues stage 1 --------------------------------------------------------------------------------------
SOURCES = ("zh", "en", "translate")


@pytest.fixture
def make_datamodule(sample_corpus, sample_tokenizer_dir, tmp_path):
    cache = tmp_path / "cache"
    specs = {
        "zh": {"kind": "text", "format": "wudao", "train": str(sample_corpus / "wudao/train"), "val": None},
        "en": {"kind": "text", "format": "pile", "train": str(sample_corpus / "pile/train"), "val": None},
        "translate": {
            "kind": "translation",
            "format": "translation",
            "train": str(sample_corpus / "translation/train"),
            "val": None,
        },
    }

    def make(rank: int, steps: int, streams_from=None, extra_newline=False, global_step=0) -> BillaDataModule:
        dm = BillaDataModule(
            specs,
            {"zh": 4, "en": 4, "translate": 2},
            {"text": "conditional_generation", "translation": "translation"},
            sample_tokenizer_dir,
            max_seq_length=64,
            micro_batch_size=5,
            global_batch_size=20,  # 2 ranks x 5 x 2 accumulation
            num_samples=20 * steps,
            seed=1,
            token_cache_dir=str(cache),
            translation_extra_newline=extra_newline,
            streams_from=streams_from,
        )
        dm.trainer = SimpleNamespace(
            global_step=global_step, global_rank=rank, world_size=2, num_nodes=1, local_rank=rank
        )
        if rank == 0:
            dm.prepare_data()
        dm.setup("fit")
        return dm

    return make


def _records_read(dm: BillaDataModule) -> dict[str, list[tuple[str, int, int]]]:
    """(file, line, epoch) of every stream record this rank's dataloader reads, per source, in order."""
    read: dict[str, list] = {name: [] for name in SOURCES}
    for index in dm.train_dataloader().sampler:
        name, row, _ = dm.train_set.locate_visit(index)
        read[name].append(dm.train_set.sources[name].record_id(row))
    return read


def _in_file_order(records) -> list:
    return sorted(records, key=lambda r: (r[2], r[0], r[1]))


def test_stage_two_starts_where_stage_one_stopped_on_two_ranks(make_datamodule, sample_corpus, tmp_path):
    """Stage 1 on 2 ranks reads each LM source's records in file order; its data state (what the export carries)
    names the last record read; stage 2 (a different objective setting: the extra translation newline) started from
    that state on 2 ranks reads only records stage 1 did not, the first of them the very next record in file order.

    Bug caught: stage 2 replaying stage 1's text (a start at the first file, or at a file boundary), skipping
    records between the stages, a state taken from one rank's share instead of the whole global stream, or a start
    that depends on the objective's tokens instead of the record's file and line."""
    stage1 = [make_datamodule(rank, steps=6) for rank in range(2)]
    read1 = {name: [r for dm in stage1 for r in _records_read(dm)[name]] for name in SOURCES}
    state = stage1[0].data_state(6 * 20)
    for dm in stage1:
        dm.teardown()
    for name in SOURCES:
        assert len(read1[name]) == len(set(read1[name])) == state["sources"][name]["records_read"]
        last = _in_file_order(read1[name])[-1]
        assert (state["sources"][name]["file"], state["sources"][name]["after_line"]) == last[:2]
    path = tmp_path / "billa_data_state.json"
    path.write_text(json.dumps(state))
    stage2 = [make_datamodule(rank, steps=3, streams_from=str(path), extra_newline=True) for rank in range(2)]
    read2 = {name: [r for dm in stage2 for r in _records_read(dm)[name]] for name in SOURCES}
    for name in SOURCES:
        ids1 = {r[:2] for r in read1[name]}
        assert not ids1 & {r[:2] for r in read2[name]}  # never a stage-1 record
        everything = []  # every usable record of the source in file order: stage 2's first is right after stage 1's
        source = stage2[0].train_set.sources[name]
        for path_ in source.files:
            fmt = {"zh": "wudao", "en": "pile", "translate": "translation"}[name]
            everything += [(Path(path_).name, r.line) for r in read_records(path_, fmt, "test")]
        after = everything.index(_in_file_order(read1[name])[-1][:2]) + 1
        assert _in_file_order(read2[name])[0][:2] == everything[after]
    for dm in stage2:
        dm.teardown()


def test_a_state_that_does_not_fit_the_corpus_stops_before_any_work(make_datamodule, tmp_path):
    """Bug caught: a data-state file from another corpus (a file name this source does not have) silently starting
    stage 2 at the first file, or failing deep in the reader, instead of one error naming the state file, the
    source's key and the way out."""
    path = tmp_path / "billa_data_state.json"
    path.write_text(json.dumps({"sources": {"zh": {"file": "10017.jsonl", "after_line": 3, "epoch": 0}}}))
    with pytest.raises(
        ConfigError,
        match=r"billa_data_state.json.*'zh'.*10017.jsonl.*data.sources.zh.train.*"
        r"data.streams_from=null",
    ):
        make_datamodule(0, steps=1, streams_from=str(path))
    with pytest.raises(ConfigError, match="data.streams_from=.*no such file"):
        make_datamodule(0, steps=1, streams_from=str(tmp_path / "missing.json"))


def test_stage_reads_only_the_files_it_needs(make_datamodule, sample_corpus, tmp_path):
    """A stage that reads the first records of a ten-file source tokenises about two of its files, not ten.

    Bug caught: the whole corpus tokenised before step 1 (days and terabytes on WuDao and PILE)."""
    dm = make_datamodule(0, steps=1)
    dm.feeder._thread.join(timeout=60)  # ends once everything the stage reads is tokenised
    for name in SOURCES:
        stream = dm.train_set.sources[name]
        done = [i for i in range(len(stream.files)) if (stream.file_dir(i) / "done.json").is_file()]
        assert len(stream.files) == 10 and 1 <= len(done) <= 3, (name, done)
    dm.teardown()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


BAD = Path(__file__).parent / "fixtures" / "bad_input"


@pytest.mark.parametrize(
    "name,message,kept",
    [
        ("non_utf8.jsonl.zst", r"2: not valid UTF-8", 2),
        ("gzip_renamed.jsonl.zst", r"1: corrupt zstd stream \(.*\): it is a gzip file, not zstd", 0),
        ("truncated.jsonl.zst", r"1688: corrupt zstd stream \(Truncated compressed stream\); 1687 lines", 1687),
        ("malformed.jsonl", r"2: not valid JSON", 2),
    ],
)
def test_a_bad_stream_file_names_file_and_line_and_skip_keeps_the_rest(name, message, kept, worker, tmp_path):
    """The streaming tokeniser reads files itself (once, front to back), so it must report damage as the readers do.

    Bug caught: a bare OSError from a damaged or mislabelled zstd stream inside a worker, the lines before the damage
    thrown away, or data.on_error=skip not skipping."""
    import re

    from billa.data.readers import DataFormatError

    work, prompts = worker
    path = str(BAD / name)
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:") + message):
        tokenise_file(path, _settings("en", "pile", "causal_lm"), str(tmp_path / "raise"), worker=work)
    settings = ObjectiveSettings("en", "pile", "causal_lm", MAX_LEN, 5, False, on_error="skip")
    source = StreamSource("en", [path], settings, tmp_path / "skip", (0, 1), prompts, work.bos_id, work.eos_id)
    tokenise_file(path, settings, str(source.file_dir(0)), piece_bytes=1 << 16, worker=work)
    markers = [json.loads(p.read_text()) for p in sorted(source.file_dir(0).glob("0*.json"))]
    assert sum(m["rows"] for m in markers) == kept
    assert sum(m["stats"]["skipped_malformed"] for m in markers) == 1


def test_validation_tokenises_only_the_records_it_uses(sample_corpus, worker, tmp_path):
    """``max_rows`` (a validation split's ``val_max_records``) stops after the piece that reaches it: the rest of the
    file is not read, and a later pass finishes the file without redoing the pieces.

    Bug caught: PILE's 1.4 GB validation shard tokenised whole before step 1 to use its first 1,000 records."""
    work, _ = worker
    path = str(sample_corpus / "pile/train/00000.jsonl")
    settings = _settings("en", "pile", "causal_lm")
    out = tmp_path / "val"
    first = tokenise_file(path, settings, str(out), piece_bytes=1500, worker=work, max_rows=5)
    assert 5 <= first["rows"] < 20 and first["pieces"] < 4 and not (out / "done.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.arrow")}
    whole = tokenise_file(path, settings, str(out), piece_bytes=1500, worker=work)
    assert whole["pieces"] > first["pieces"] and (out / "done.json").is_file()
    assert all(out.joinpath(name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())  # not redone
