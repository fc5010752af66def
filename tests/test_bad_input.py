"""Bad input as an adversarial user would bring it: one fixture file per case in tests/fixtures/bad_input/.

Each case must stop with an error naming the file and line (``data.on_error=raise``), or, under ``skip``, keep every
readable record and count the rest — never a bare library exception, never silent loss.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from billa.data.readers import DataFormatError, ReadStats, read_records

FIXTURES = Path(__file__).parent / "fixtures" / "bad_input"

# file, reader format and options, the error it must raise (after "file:"), records kept and skipped under skip
READER_CASES = [
    ("malformed.jsonl", "pile", {}, r"2: not valid JSON", 2, 1),
    ("missing_field.jsonl", "pile", {}, r"2: PILE record lacks string field\(s\) \['text'\]", 1, 1),
    ("non_utf8.jsonl", "pile", {}, r"2: not valid UTF-8 \(byte 13 of the line", 2, 1),
    (
        "non_utf8.json",
        "wudao",
        {},
        r"2: array element 2 is not valid UTF-8 \(first bad byte at offset 179, line 2\)",
        2,
        1,
    ),
    ("non_utf8.jsonl.zst", "pile", {}, r"2: not valid UTF-8", 2, 1),
    ("gzip_renamed.jsonl.zst", "pile", {}, r"1: corrupt zstd stream \(.*\): it is a gzip file, not zstd", 0, 1),
    (
        "truncated.jsonl.zst",
        "pile",
        {},
        r"1688: corrupt zstd stream \(Truncated compressed stream\); 1687 lines",
        1687,
        1,
    ),
    (
        "alpaca_input_not_string.json",
        "instruction",
        {},
        r"2: .* field 'input' must be a string \(or absent\), got list",
        2,
        1,
    ),
    ("dolly_context_not_string.jsonl", "instruction", {}, r"2: Dolly .* field 'context' must be a string", 1, 1),
    (
        "pile_meta_not_object.jsonl",
        "pile",
        {"pile_sets": ["Pile-CC"]},
        r"2: PILE record field 'meta' must be an object",
        1,
        1,
    ),
    (
        "task_type_not_string.jsonl",
        "task",
        {},
        r"2: task .* field 'type' must be a string \(or absent\), got int 7",
        1,
        1,
    ),
]


@pytest.mark.parametrize("name,fmt,options,message,kept,skipped", READER_CASES, ids=[c[0] for c in READER_CASES])
def test_bad_file_names_file_and_line_and_skip_counts_it(name, fmt, options, message, kept, skipped):
    """Bugs caught: a bare UnicodeDecodeError / OSError without a path (non-UTF-8 bytes, a gzip file named .zst,
    a truncated stream); ``skip`` not skipping them; records before the damage thrown away; a list ``input``, a dict
    ``context``, a string ``meta`` or an int ``type`` passing the reader and crashing later inside a worker."""
    path = FIXTURES / name
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:") + message):
        list(read_records(path, fmt, "data.sources.en.train", **options))
    stats = ReadStats()
    records = list(read_records(path, fmt, "data.sources.en.train", stats, on_error="skip", **options))
    assert (len(records), stats.read, stats.skipped) == (kept, kept, skipped)
    assert stats.skipped_examples[0].startswith(f"{path}:")
    for record in records:  # what reaches the objectives is plain strings (type may be None)
        assert all(isinstance(v, str) or (k == "type" and v is None) for k, v in record.fields.items()), record


# file, format, records kept, records left out for empty text (under raise and skip alike), the first reason
EMPTY_CASES = [
    ("empty_text.jsonl", "pile", 1, 2, "2: empty text"),
    ("empty_translation.jsonl", "translation", 1, 2, "2: empty en"),
    ("empty_output.jsonl", "instruction", 2, 2, "2: empty output"),  # and line 3: no instruction nor input
]


@pytest.mark.parametrize("name,fmt,kept,empty,reason", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_empty_texts_are_left_out_and_counted(name, fmt, kept, empty, reason):
    """Bug caught: ``{"text": ""}``, an empty side of a pair or an empty output silently becoming a training
    example (BOS + EOS only, or a prompt with nothing to learn)."""
    path = FIXTURES / name
    for on_error in ("raise", "skip"):
        stats = ReadStats()
        records = list(read_records(path, fmt, "data.sources.x.train", stats, on_error=on_error))
        assert (len(records), stats.read, stats.empty, stats.skipped) == (kept, kept, empty, 0)
        assert stats.skipped_examples[0] == f"{path}:{reason}"


def test_tokenisation_pass_reports_skipped_and_empty_records(tmp_path, sample_tokenizer_dir, caplog):
    """Bug caught: counts lost between the reader and the data report (a worker's stats not carried to the end)."""
    from billa.data.cache import ObjectiveSettings, tokenize_source
    from billa.data.datamodule import DEFAULT_PROMPTS_DIR
    from billa.train import report_data

    data = tmp_path / "data"
    data.mkdir()
    for name in ("empty_text.jsonl", "non_utf8.jsonl", "malformed.jsonl"):
        (data / name).write_bytes((FIXTURES / name).read_bytes())
    settings = ObjectiveSettings("en", "pile", "causal_lm", 64, 0, False, on_error="skip")
    dataset, stats = tokenize_source(
        str(data / "*.jsonl"), settings, sample_tokenizer_dir, str(DEFAULT_PROMPTS_DIR), tmp_path / "c"
    )
    assert len(dataset) == stats["examples"] == 1 + 2 + 2
    assert (stats["empty_text"], stats["skipped_malformed"], stats["files"]) == (2, 2, 3)
    with caplog.at_level("INFO", logger="billa"):
        report_data({"en/train": stats})
    assert "'skipped_malformed': 2" in caplog.text and "'empty_text': 2" in caplog.text
