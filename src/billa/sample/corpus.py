"""The embedded sample data of all three stages, built offline from text an installed PyPI package ships.

``hsk-sentences-audio`` ships 4,354 graded Chinese sentences with English translations, pinyin and word glosses
(CC-BY-SA-4.0); the ~80 whose English is a placeholder are left out. Stage 1's sources group them by topic into
short documents, written in the real record formats:

- ``wudao/train/NNNNN.json`` + ``wudao/val.json``: WuDao 2.0 JSON arrays ``{id, uniqueKey, titleUkey, dataType,
  title, content}``;
- ``pile/train/NNNNN.jsonl`` + ``pile/val.jsonl``: PILE jsonl ``{"text", "meta": {"pile_set_name"}}`` (English);
- ``translation/train/NNNNN.jsonl`` + ``translation/val.jsonl``: BiLLa's ``{"en_text", "zh_text"}`` pairs.

Language-model training data is split into ``SHARDS`` numbered files (document ``i`` goes to shard ``i % SHARDS``),
like BiLLa's ``<source>/<NNNNN>.jsonl`` layout, so that stage 2 can read files stage 1 never saw
(``data.sources.<name>.slices``). Stage 2's ten task sets (``tasks/{train,val}/<name>.jsonl``) and stage 3's
instruction sets (``sft/{train,val}/<name>/``) come from ``billa.sample.tasks``. Every 20th document (and
sentence pair) and every 10th task / instruction record goes to the validation split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

from billa.utils.logging import get_logger

log = get_logger(__name__)

SENTENCES_PER_DOC = 8
VAL_EVERY = 20
SHARDS = 10
_MANIFEST = "manifest.json"
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]")
_VERSION = 7  # bumped when the layout changes: an older corpus in the cache is rebuilt

TOPIC_TITLES = {  # Chinese titles for the package's topic tags, so WuDao records carry Chinese titles
    "greetings": "问候",
    "feelings": "感受",
    "school_work": "学习与工作",
    "objects_misc": "日常物品",
    "misc": "生活杂谈",
    "sports_leisure": "运动与休闲",
    "identity": "个人情况",
    "daily_actions": "日常活动",
    "shopping": "购物",
    "transport": "交通",
    "location": "地点",
    "nature": "自然",
    "health_body": "健康与身体",
    "time": "时间",
    "food": "饮食",
    "questions": "提问",
    "family": "家庭",
    "numbers": "数字",
    "weather_state": "天气",
}


def has_translation(sentence: dict) -> bool:
    """False for the package's ~80 sentences whose English is a stand-in (``placeholder-p1`` ...) and the 2 whose
    English contains Chinese characters (the English side must be English: the vocabulary tests rely on it)."""
    english = sentence["translation"]["en"].strip()
    return bool(english) and not english.lower().startswith("placeholder") and not _CJK.search(english)


def _load_sentences() -> list[dict]:
    from hsk_sentences_audio import load_sentences

    return [sentence for sentence in load_sentences() if has_translation(sentence)]


def _documents(sentences: list[dict]) -> list[tuple[str, list[dict]]]:
    """Group sentences by topic (in the package's order) into documents of SENTENCES_PER_DOC sentences."""
    by_topic: dict[str, list[dict]] = defaultdict(list)
    for sentence in sentences:
        by_topic[sentence["topic"]].append(sentence)
    docs = []
    for topic, group in by_topic.items():
        for start in range(0, len(group), SENTENCES_PER_DOC):
            docs.append((topic, group[start : start + SENTENCES_PER_DOC]))
    return docs


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _write_json(path: Path, records: list, lines: bool) -> None:
    _write_atomic(path, _jsonl(records) if lines else json.dumps(records, ensure_ascii=False, indent=1))


def _lm_records(sentences: list[dict]) -> dict[str, dict[str, list]]:
    """Stage 1's sources: split -> kind -> records (train records carry their document index for sharding)."""
    splits: dict[str, dict[str, list]] = {"train": defaultdict(list), "val": defaultdict(list)}
    for i, (topic, group) in enumerate(_documents(sentences)):
        split = splits["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"]
        title = f"{TOPIC_TITLES.get(topic, topic)}（{i + 1}）"
        split["wudao"].append(
            {
                "id": i,
                "uniqueKey": hashlib.md5(group[0]["id"].encode()).hexdigest(),
                "titleUkey": hashlib.md5(title.encode()).hexdigest(),
                "dataType": "百科",
                "title": title,
                "content": "".join(s["chinese"] for s in group),
            }
        )
        split["pile"].append(
            {"text": " ".join(s["translation"]["en"] for s in group), "meta": {"pile_set_name": "Pile-CC"}}
        )
    seen = set()  # the package repeats a few sentences: one pair each, so no pair is in two shards (or splits)
    for i, sentence in enumerate(sentences):
        if sentence["chinese"] in seen:
            continue
        seen.add(sentence["chinese"])
        split = splits["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"]
        split["translation"].append({"en_text": sentence["translation"]["en"], "zh_text": sentence["chinese"]})
    return splits


def _split(records: list) -> tuple[list, list]:
    from billa.sample.tasks import VAL_EVERY as TASK_VAL_EVERY

    train = [r for i, r in enumerate(records) if i % TASK_VAL_EVERY != TASK_VAL_EVERY - 1]
    val = [r for i, r in enumerate(records) if i % TASK_VAL_EVERY == TASK_VAL_EVERY - 1]
    return train, val


def build_sample_corpus(out_dir: str | os.PathLike) -> dict[str, int]:
    """Write the sample data of all three stages under ``out_dir`` unless a complete one is already there.

    Returns:
        Record counts (``{"wudao/train": 517, "tasks/zh-reasoning/train": 180, ...}``), also stored in
        ``manifest.json``, which is written last so an interrupted build is redone on the next call.
    """
    from billa.sample.tasks import stage2_task_sets, stage3_sets

    out = Path(out_dir)
    manifest = out / _MANIFEST
    if manifest.exists():
        stored = json.loads(manifest.read_text(encoding="utf-8"))
        if stored.get("version") == _VERSION:
            return stored["counts"]

    sentences = _load_sentences()
    counts = {}
    suffix = {"wudao": ".json", "pile": ".jsonl", "translation": ".jsonl"}
    for split_name, kinds in _lm_records(sentences).items():
        for kind, records in kinds.items():
            counts[f"{kind}/{split_name}"] = len(records)
            if split_name == "val":
                _write_json(out / kind / f"val{suffix[kind]}", records, suffix[kind] == ".jsonl")
                continue
            for shard in range(SHARDS):
                part = records[shard::SHARDS]
                _write_json(out / kind / "train" / f"{shard:05d}{suffix[kind]}", part, suffix[kind] == ".jsonl")
    documents = [
        (topic, f"{TOPIC_TITLES.get(topic, topic)}（{i + 1}）", group)
        for i, (topic, group) in enumerate(_documents(sentences))
    ]
    for name, records in stage2_task_sets(sentences, documents).items():
        for split_name, part in zip(("train", "val"), _split(records), strict=True):
            _write_json(out / "tasks" / split_name / f"{name}.jsonl", part, True)
            counts[f"tasks/{name}/{split_name}"] = len(part)
    for name, files in stage3_sets(sentences, documents).items():
        for file_name, records, as_array in files:
            for split_name, part in zip(("train", "val"), _split(records), strict=True):
                _write_json(out / "sft" / split_name / name / file_name, part, not as_array)
                key = f"sft/{name}/{split_name}"
                counts[key] = counts.get(key, 0) + len(part)
    source = {
        "package": "hsk-sentences-audio",
        "license": "CC-BY-SA-4.0 (derived data); generated math/code/multi-hop records: Apache-2.0",
        "sentences": len(sentences),
    }
    _write_atomic(manifest, json.dumps({"version": _VERSION, "counts": counts, "source": source}, indent=1))
    log.info("Built the sample data in %s (%d files)", out, len(counts))
    return counts


def sample_texts(out_dir: str | os.PathLike, split: str = "train") -> tuple[list[str], list[str]]:
    """Chinese and English plain texts of the stage-1 sample (for tokenizer training and reports), all shards."""
    out = Path(out_dir)
    build_sample_corpus(out)
    wudao_files = sorted((out / "wudao" / "train").glob("*.json")) if split == "train" else [out / "wudao" / "val.json"]
    pile_files = sorted((out / "pile" / "train").glob("*.jsonl")) if split == "train" else [out / "pile" / "val.jsonl"]
    zh = [r["title"] + "\n\n" + r["content"] for f in wudao_files for r in json.loads(f.read_text(encoding="utf-8"))]
    en = [json.loads(line)["text"] for f in pile_files for line in f.read_text(encoding="utf-8").splitlines()]
    return zh, en
