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
