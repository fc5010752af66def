"""Work split below the file level: pieces of a file, worker processes, and resume from finished pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import billa.data.tokenise as tokenise
from billa.data.cache import ObjectiveSettings, tokenize_source
from billa.data.datamodule import DEFAULT_PROMPTS_DIR
from billa.data.readers import DataFormatError, plan_pieces, read_piece, read_records
from billa.tokenizer.load import load_tokenizer

TEXTS = [f"line {i}: 你好 world {'x' * (i % 13)}" for i in range(60)]


def _rows(texts: list[str]) -> list[dict]:
    return [{"text": text, "meta": {"pile_set_name": "Pile-CC"}} for text in texts]


def _write_all_formats(folder: Path) -> dict[str, Path]:
    """The same 60 PILE records as .jsonl (with blank lines and no final newline), .jsonl.zst, parquet, JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in _rows(TEXTS)]
    lines.insert(10, "")  # a blank line: skipped, but it still counts for the line numbers after it
    jsonl = folder / "a.jsonl"
    jsonl.write_text("\n".join(lines), encoding="utf-8")  # no newline after the last line
    zst = folder / "b.jsonl.zst"
    with pa.CompressedOutputStream(str(zst), "zstd") as out:
        out.write(("\n".join(lines) + "\n").encode())
    parquet = folder / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in TEXTS]), parquet, row_group_size=7)
    array = folder / "d.json"
    array.write_text(json.dumps(_rows(TEXTS), ensure_ascii=False), encoding="utf-8")
    return {"jsonl": jsonl, "zst": zst, "parquet": parquet, "json": array}


def test_pieces_cover_each_file_once_with_the_files_line_numbers(tmp_path):
    """Catches a piece boundary that drops or repeats the line at the edge, a piece whose line numbers restart at 1
    (errors would name the wrong line), and a plan that depends on anything but the file (resume across passes)."""
    files = _write_all_formats(tmp_path)
    for name, path in files.items():
        whole = [(r.line, r.fields["text"]) for r in read_records(path, "pile", "data.sources.en")]
        assert [text for _, text in whole] == TEXTS, name
        pieces = plan_pieces(str(path), piece_bytes=300)
        assert plan_pieces(str(path), piece_bytes=300) == pieces  # the same plan on every pass
        if name in ("json", "zst"):  # a JSON array is parsed whole, a zstd stream decompressed once: one piece
            assert len(pieces) == 1, (name, len(pieces))
        else:
            assert len(pieces) > 3, (name, len(pieces))
        assert [p.index for p in pieces] == list(range(len(pieces)))
        joined = [(r.line, r.fields["text"]) for p in pieces for r in read_piece(p, "pile")]
        assert joined == whole, name
        if name == "jsonl":
            assert sum(p.size for p in pieces) == path.stat().st_size


def _settings(on_error: str = "raise") -> ObjectiveSettings:
    return ObjectiveSettings("en", "pile", "conditional_generation", 32, 0, False, on_error=on_error)


def test_worker_processes_write_the_shards_one_process_writes(tmp_path, sample_tokenizer_dir):
    """Catches pieces joined out of order (workers finish in any order), a piece lost or doubled in the join, and
    workers that tokenise differently from the driver: shards must not depend on num_proc or the piece size."""
    files = [str(p) for p in _write_all_formats(tmp_path / "data").values()]
    args = (files, _settings(), sample_tokenizer_dir, str(DEFAULT_PROMPTS_DIR))
    alone, stats_alone = tokenize_source(*args, tmp_path / "one")  # one process, one piece per file
    pooled, stats = tokenize_source(*args, tmp_path / "two", num_proc=2, piece_bytes=300)
    assert stats["examples"] == stats_alone["examples"] == 4 * 60
    assert stats["records"] == stats_alone["records"] == 4 * 60
    assert pooled.dataset[:] == alone.dataset[:]
    shards = list((tmp_path / "two").rglob("data.arrow"))
    assert len(shards) == 4 and not list((tmp_path / "two").rglob("*.pieces"))  # pieces joined and removed


def test_a_worker_reports_a_bad_line_of_a_later_piece_with_its_file_line(tmp_path, sample_tokenizer_dir):
    """Catches a worker's error lost or replaced by a generic one, and line numbers counted from the piece start."""
    lines = [json.dumps(r) for r in _rows(TEXTS)]
    lines[47] = '{"text": "broken'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ([str(bad)], _settings(), sample_tokenizer_dir, str(DEFAULT_PROMPTS_DIR), tmp_path / "cache")
    with pytest.raises(DataFormatError, match=rf"{bad}:48: not valid JSON"):
        tokenize_source(*args, num_proc=2, piece_bytes=300)
    skip = ([str(bad)], _settings("skip"), *args[2:])
    _, stats = tokenize_source(*skip, num_proc=2, piece_bytes=300)
    assert stats["skipped_malformed"] == 1 and stats["examples"] == 59
    assert stats["skipped_examples"][0].startswith(f"{bad}:48:")


def test_a_failed_pass_keeps_its_finished_pieces(tmp_path, sample_tokenizer_dir, monkeypatch):
    """Catches a resume that redoes the finished pieces of a large file (hours of a PILE shard on a killed node),
    and one that reuses a piece whose Arrow file was never completed."""
    path = _write_all_formats(tmp_path / "data")["jsonl"]
    args = ([str(path)], _settings(), sample_tokenizer_dir, str(DEFAULT_PROMPTS_DIR), tmp_path / "cache")
    original, calls = tokenise.tokenize_piece, []

    def failing(piece, settings, out):
        calls.append(piece.index)
        if piece.index == 3:
            Path(out + ".tmp-somehost-1").write_bytes(b"half a piece")  # a killed writer's leftover
            raise OSError("disk full")
        return original(piece, settings, out)

    monkeypatch.setattr(tokenise, "tokenize_piece", failing)
    with pytest.raises(OSError, match="disk full"):
        tokenize_source(*args, piece_bytes=300)
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.pieces/*.arrow")}
    assert len(finished) == 3  # pieces 0-2
    calls.clear()
    monkeypatch.setattr(tokenise, "tokenize_piece", lambda *a: calls.append(a[0].index) or original(*a))
    resumed, stats = tokenize_source(*args, piece_bytes=300)
    assert calls and min(calls) == 3 and len(calls) == len(plan_pieces(str(path), 300)) - 3
    fresh, _ = tokenize_source(*args[:4], tmp_path / "fresh")
    assert resumed.dataset[:] == fresh.dataset[:] and stats["examples"] == 60
    assert all(not p.exists() for p in finished)  # joined into the shard, then removed


def test_workers_encode_as_the_transformers_tokenizer(sample_tokenizer_dir):
    """Catches workers (which load only the `tokenizers` backend) producing ids that differ from the transformers
    tokenizer users, evaluation and chat load: leading spaces, newlines, special-token text, emoji."""
    tokenizer = load_tokenizer(sample_tokenizer_dir)
    texts = [" leading", "a  b\n\nc\t d", "你好，世界！ Hello</s> <s>x", "", "Human: 问题\nAssistant: 答", "é 😀 ∑"]
    worker = tokenise._Worker(tokenise.tokenizer_spec(tokenizer), {})
    assert worker.encode(texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_a_worker_that_dies_is_named_with_its_piece(tmp_path, sample_tokenizer_dir):
    """Catches a driver that hangs, or raises an unpickling traceback, when the kernel kills a worker (out of memory)"""
    import signal

    path = _write_all_formats(tmp_path / "data")["jsonl"]
    spec = tokenise.tokenizer_spec(load_tokenizer(sample_tokenizer_dir))
    with tokenise.WorkerPool(1, spec, {}) as pool:
        piece = plan_pieces(str(path), 300)[2]
        pool.submit(("piece", piece, _settings(), str(tmp_path / "out.arrow")))
        pool.workers[0].send_signal(signal.SIGKILL)
        with pytest.raises(RuntimeError, match=rf"exit code -9.* while (starting|tokenising {path} \(piece 2\))"):
            while pool.next_result() is not None:
                pass
