"""The sample corpus laid out as BiLLa's training code reads its data (``data=billa_repo``).

BiLLa's ``train_codes/pretraining_corpora/`` holds one directory per source with numbered jsonl files
(``<source>/<NNNNN>.jsonl`` from 10001), ``prompts/<type>.{pre,post}.prompt`` and ``translate/{en-zh,zh-en}.prompt``.
This builder writes billa's sample data in that layout, so that ``data=billa_repo`` (and a user with BiLLa's own
data) is exercised end to end: text sources as ``{"text"}``, translation as ``{"en_text", "zh_text"}``, task sets
``{"id", "input", "output", "type"}``, SFT sets as their records; the prompt files are billa's own set
(``conf/prompts``) written under BiLLa's file names via ``data.prompt_types``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from billa.data.readers import read_records
from billa.sample.corpus import build_sample_corpus

FIRST_FILE = 10001  # BiLLa numbers its files from 10001
LM_FILES = {"zh": 18, "en": 42, "translate": 10}  # enough files for stage 2's file_start (10017, 10041, 10009)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _spread(out: Path, name: str, records: list[dict], n_files: int) -> None:
    """``records`` over ``n_files`` numbered files (round robin, every file non-empty)."""
    for k in range(n_files):
        _write_jsonl(out / name / f"{FIRST_FILE + k}.jsonl", records[k::n_files])


def _raw_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _texts(sample: Path, pattern: str, fmt: str) -> list[dict]:
    return [{"text": r.fields["text"]} for f in sorted(sample.glob(pattern)) for r in read_records(str(f), fmt, fmt)]


def build_billa_repo_sample(
    out_dir: str | os.PathLike, prompts_dir: str | os.PathLike, prompt_types: Mapping[str, str]
) -> dict[str, int]:
    """Write the sample corpus in BiLLa's layout under ``out_dir``; returns files per source.

    Args:
        out_dir: the ``pretraining_corpora``-like root (``data.root`` of ``data=billa_repo``).
        prompts_dir: billa's prompt set to write in BiLLa's layout (``conf/prompts``).
        prompt_types: record type -> stem of ``prompts_dir`` (``data.prompt_types``); each type gets its own files.
    """
    out = Path(out_dir)
    if (out / "prompts").is_dir():
        return {p.name: len(list(p.glob("*.jsonl"))) for p in out.iterdir() if p.is_dir()}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sample = tmp / "_sample"
    build_sample_corpus(sample)
    _spread(tmp, "zh", _texts(sample, "wudao/train/*.json", "wudao"), LM_FILES["zh"])
    _spread(tmp, "en", _texts(sample, "pile/train/*.jsonl", "pile"), LM_FILES["en"])
    pairs = [
        {"en_text": r.fields["en"], "zh_text": r.fields["zh"]}
        for f in sorted(sample.glob("translation/train/*.jsonl"))
        for r in read_records(str(f), "translation", "translation")
    ]
    _spread(tmp, "translate", pairs, LM_FILES["translate"])
    for path in sorted(sample.glob("tasks/train/*.jsonl")):
        _spread(tmp, path.stem, _raw_records(path), 1)
    for directory in sorted(p for p in sample.glob("sft/train/*") if p.is_dir()):
        _spread(tmp, directory.name, [r for f in sorted(directory.iterdir()) for r in _raw_records(f)], 1)
    (tmp / "prompts").mkdir()
    for kind, stem in prompt_types.items():
        for placement in ("pre", "post"):
            source = Path(prompts_dir) / f"{stem}.{placement}.prompt"
            if source.is_file():
                shutil.copyfile(source, tmp / "prompts" / f"{kind}.{placement}.prompt")
    (tmp / "translate").mkdir(exist_ok=True)
    for direction, billa_name in (("en2zh", "en-zh"), ("zh2en", "zh-en")):
        shutil.copyfile(
            Path(prompts_dir) / f"translation.{direction}.prompt", tmp / "translate" / f"{billa_name}.prompt"
        )
    shutil.rmtree(sample)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return {p.name: len(list(p.glob("*.jsonl"))) for p in out.iterdir() if p.is_dir()}
