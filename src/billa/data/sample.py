"""The embedded sample corpus, built offline from text an installed PyPI package ships.

``hsk-sentences-audio`` ships 4,354 graded Chinese sentences with English translations (CC-BY-SA-4.0). They are
grouped by topic into short documents and written in the real record formats of DESIGN.md §4:

- ``wudao/{train,val}.json``: WuDao 2.0 JSON arrays ``{id, uniqueKey, titleUkey, dataType, title, content}``;
- ``pile/{train,val}.jsonl``: PILE jsonl ``{"text", "meta": {"pile_set_name"}}`` (the English translations);
- ``translation/{train,val}.jsonl``: BiLLa's ``{"en_text", "zh_text"}`` sentence pairs.

Every 20th document (and sentence pair) goes to the validation split.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from billa.utils.logging import get_logger

log = get_logger(__name__)

SENTENCES_PER_DOC = 8
VAL_EVERY = 20
_MANIFEST = "manifest.json"

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


def _load_sentences() -> list[dict]:
    from hsk_sentences_audio import load_sentences

    return load_sentences()


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


def build_sample_corpus(out_dir: str | os.PathLike) -> dict[str, int]:
    """Write the sample corpus under ``out_dir`` unless a complete one is already there.

    Returns:
        Record counts per file (``{"wudao/train.json": 517, ...}``), also stored in ``manifest.json``, which is
        written last so an interrupted build is redone on the next call.
    """
    out = Path(out_dir)
    manifest = out / _MANIFEST
    if manifest.exists():
        return json.loads(manifest.read_text(encoding="utf-8"))["counts"]

    sentences = _load_sentences()
    splits: dict[str, dict[str, list]] = {"train": defaultdict(list), "val": defaultdict(list)}
    for i, (topic, group) in enumerate(_documents(sentences)):
        split = splits["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"]
        title = f"{TOPIC_TITLES.get(topic, topic)}（{i + 1}）"
        doc_id = group[0]["id"]
        unique_key = hashlib.md5(doc_id.encode()).hexdigest()
        split["wudao"].append(
            {
                "id": i,
                "uniqueKey": unique_key,
                "titleUkey": hashlib.md5(title.encode()).hexdigest(),
                "dataType": "百科",
                "title": title,
                "content": "".join(s["chinese"] for s in group),
            }
        )
        split["pile"].append(
            {"text": " ".join(s["translation"]["en"] for s in group), "meta": {"pile_set_name": "Pile-CC"}}
        )
    for i, sentence in enumerate(sentences):
        split = splits["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"]
        split["translation"].append({"en_text": sentence["translation"]["en"], "zh_text": sentence["chinese"]})

    counts = {}
    for split_name, kinds in splits.items():
        _write_atomic(out / "wudao" / f"{split_name}.json", json.dumps(kinds["wudao"], ensure_ascii=False, indent=1))
        _write_atomic(out / "pile" / f"{split_name}.jsonl", _jsonl(kinds["pile"]))
        _write_atomic(out / "translation" / f"{split_name}.jsonl", _jsonl(kinds["translation"]))
        counts.update({f"{kind}/{split_name}": len(records) for kind, records in kinds.items()})
    source = {"package": "hsk-sentences-audio", "license": "CC-BY-SA-4.0", "sentences": len(sentences)}
    _write_atomic(manifest, json.dumps({"counts": counts, "source": source}, indent=1))
    log.info("Built the sample corpus in %s: %s", out, counts)
    return counts


def sample_texts(out_dir: str | os.PathLike, split: str = "train") -> tuple[list[str], list[str]]:
    """Chinese and English plain texts of the sample corpus (for tokenizer training and reports)."""
    out = Path(out_dir)
    build_sample_corpus(out)
    wudao = json.loads((out / "wudao" / f"{split}.json").read_text(encoding="utf-8"))
    zh = [r["title"] + "\n\n" + r["content"] for r in wudao]
    with open(out / "pile" / f"{split}.jsonl", encoding="utf-8") as handle:
        en = [json.loads(line)["text"] for line in handle]
    return zh, en
