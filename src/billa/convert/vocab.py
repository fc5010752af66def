"""``convert.py op=expand_vocab``: read the configured corpora and hand their lines to the vocabulary expansion.

The expansion itself (``billa.tokenizer.expand``) takes texts; reading files in any reader format is done here, in the
op, so the tokenizer package does not depend on the data readers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from billa.data.readers import expand_paths, read_records, record_kind
from billa.tokenizer.expand import expand_vocabulary
from billa.utils.logging import get_logger

log = get_logger(__name__)


def texts_from_sources(
    sources: Sequence[dict], field: str = "zh", limit: int | None = None, key: str = "op.chinese_text"
) -> Iterator[str]:
    """Text of records in any reader format: ``[{"path": glob, "format": "wudao"}, ...]``.

    Text kinds give their text, translation pairs their ``field`` side, task and instruction records their
    input and output. ``key`` is the config key of ``sources``, named in errors (``op.english_text[0]``).
    """
    count = 0
    for i, source in enumerate(sources):
        kind = record_kind(source["format"])
        what = f"{key}[{i}]"
        options = {k: v for k, v in source.items() if k not in ("path", "format")}
        for record in read_records(source["path"], source["format"], what, **options):
            fields = record.fields
            if kind == "text":
                parts = [fields["text"]]
            elif kind == "translation":
                parts = [fields[field]]
            elif kind == "task":
                parts = [fields["input"], fields["output"]]
            else:
                parts = [fields["instruction"], fields.get("input", ""), fields["output"]]
            for text in parts:
                for line in text.splitlines():
                    if line.strip():
                        yield line
                        count += 1
                        if limit is not None and count >= limit:
                            return


def expand_vocab(
    base_tokenizer: str,
    chinese_text: Sequence[dict],
    out_dir: str,
    vocab_size: int = 20000,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    max_lines: int | None = None,
    keep_ascii_pieces: bool = False,
    report_text: dict[str, Sequence[dict]] | None = None,
    report_max_lines: int = 2000,
    base_model: str | None = None,
    init: str = "subword_mean",
    pad_to_multiple_of: int | None = None,
    seed: int = 0,
    added_pieces: int | None = None,
    english_text: Sequence[dict] | None = None,
) -> dict:
    """``convert.py op=expand_vocab``: expanded tokenizer (and, with ``base_model``, the resized model) in ``out_dir``.

    Args:
        base_tokenizer: HF directory with ``tokenizer.model`` or a bare SentencePiece ``.model``.
        chinese_text: ``[{"path": glob, "format": reader format}, ...]`` to train the Chinese model on.
        report_text: ``{"zh": [...sources], "en": [...sources]}`` measured before/after (first lines of each).
        base_model: HF model directory whose embeddings and lm_head are resized; None writes only the tokenizer.
        added_pieces: exactly this many new pieces (the first of the Chinese model's order); None: all it offers.
        english_text: English sources; only read through ``report_text`` (the config's ``en: ${..english_text}``).
    """
    for i, source in enumerate(chinese_text):  # a missing corpus stops here, before the report reads anything
        expand_paths(source["path"], f"op.chinese_text[{i}]")
    keys = {"op.chinese_text": chinese_text, "op.english_text": english_text}
    report_texts = _report_texts(report_text or {}, keys, report_max_lines)
    # a generator: the Chinese corpus is streamed into the expansion, never held twice
    lines = texts_from_sources(chinese_text, limit=max_lines)
    return expand_vocabulary(
        base_tokenizer,
        lines,
        out_dir,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        keep_ascii_pieces=keep_ascii_pieces,
        report_texts=report_texts,
        added_pieces=added_pieces,
        base_model=base_model,
        init=init,
        pad_to_multiple_of=pad_to_multiple_of,
        seed=seed,
    )


def _report_texts(report_text: Mapping, keys: dict, limit: int) -> dict[str, list[str]]:
    """The first ``limit`` lines of each report row (``{"zh": sources, "en": sources}``).

    A row whose files are absent (the English default, ``data/pile/train/*.jsonl``, when only Chinese text is at
    hand) or that has no sources (null) is left out with a warning naming its key; the expansion does not need it.
    """
    texts = {}
    for name, sources in report_text.items():
        key = next((k for k, v in keys.items() if sources is not None and v == sources), f"op.report_text.{name}")
        if not sources:
            log.warning("Vocabulary report: no %r row (%s is empty)", name, key)
            continue
        try:
            texts[name] = list(texts_from_sources(sources, field=name, limit=limit, key=key))
        except FileNotFoundError as err:
            log.warning("Vocabulary report: no %r row (%s); set %s to measure it", name, err, key)
    return texts
