"""The rehearsal corpus: small, short-record data in BiLLa's own layouts and file names, for the 7B rehearsal.

``python -m billa.sample.rehearsal OUT_DIR`` (the ``billa.data.rehearsal`` of issue 21: billa keeps data generators
in ``billa.sample``, readers in ``billa.data``) writes

- ``OUT_DIR/billa_repo/``: the layout of BiLLa's ``train_codes/pretraining_corpora/`` as ``conf/data/billa_repo.yaml``
  reads it: ``zh/``, ``en/``, ``translate/`` with numbered files from ``10001.jsonl`` (enough of them that stage 2's
  file starts 10017 zh, 10041 en and 10009 translate exist), one directory per task and SFT set, ``prompts/`` and
  ``translate/{en-zh,zh-en}.prompt``;
- ``OUT_DIR/billa/``: ``conf/data/billa.yaml``'s layout with the real corpora's file names: WuDao 2.0's
  ``wudao/part-2021NNNNNN.json`` JSON arrays, PILE's 30 train shards ``pile/train/00.jsonl.zst`` ...
  ``29.jsonl.zst`` and ``pile/val.jsonl.zst`` (zstd, with ``meta.pile_set_name``: Pile-CC, Github and a set BiLLa
  drops), ``translation/*.jsonl``, ``tasks/<name>.jsonl`` and ``sft/`` (Alpaca ``.json`` array, jsonl, ``others/``);
- ``OUT_DIR/tokenizer/``: the tiny default's expanded SentencePiece tokenizer (``billa.sample.tokenizer``), which
  ``+experiment=rehearsal`` reads as ``model.tokenizer.path`` (LLaMA's own is not on a CPU test machine).

The text comes from the embedded sample (``billa.sample.corpus``, ``billa.sample.tasks``), cut short: one or two
sentences per document and the shortest task and instruction records, so that a step of BiLLa's 160 sequences is
seconds on a CPU while ``data.max_seq_length`` stays 1,024. A few hundred records per LM source.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from billa.sample.billa_repo import FIRST_FILE, LM_FILES
from billa.sample.corpus import build_sample_corpus

ZH_PER_FILE, EN_PER_FILE, TRANSLATE_PER_FILE = 12, 6, 25  # x 18, 42, 10 numbered files: 216, 252, 250 records
TASK_RECORDS = 40  # the shortest records of each stage-2 task set
SFT_RECORDS = 24  # the shortest records of each stage-3 file
PILE_SHARDS = 30  # PILE's train split: 00.jsonl.zst ... 29.jsonl.zst
PILE_PER_SHARD = 8  # 5 Pile-CC, 2 Github, 1 Wikipedia (en) (dropped by data.sources.en.pile_sets)
WUDAO_PARTS = 20  # WuDao 2.0 ships part-2021NNNNNN.json files
WUDAO_PER_PART = 12
_VERSION = 1
_MANIFEST = "rehearsal.json"


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _json(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")


def _jsonl_zst(path: Path, records: list[dict]) -> None:
    """A zstd-compressed jsonl file as PILE ships them (pyarrow's codec: the one billa's reader uses)."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.output_stream(str(path), compression="zstd") as stream:
        stream.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def _raw(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]


def _size(record: dict) -> int:
    return sum(len(v) for v in record.values() if isinstance(v, str))


def _shortest(records: list[dict], n: int) -> list[dict]:
    """The ``n`` shortest records (total characters of their string fields), in their original order."""
    keep = set(sorted(range(len(records)), key=lambda i: (_size(records[i]), i))[:n])
    return [r for i, r in enumerate(records) if i in keep]


def _sentences(sample: Path) -> list[tuple[str, str]]:
    """(Chinese, English) sentence pairs of the sample's translation sources, train then val."""
    pairs = []
    for path in [*sorted((sample / "translation" / "train").glob("*.jsonl")), sample / "translation" / "val.jsonl"]:
        pairs += [(r["zh_text"], r["en_text"]) for r in _raw(path)]
    return pairs


def _spread(root: Path, name: str, records: list[dict], n_files: int, per_file: int) -> None:
    for k in range(n_files):
        _jsonl(root / name / f"{FIRST_FILE + k}.jsonl", records[k * per_file : (k + 1) * per_file])


def _write_billa_repo(root: Path, sample: Path, pairs: list[tuple[str, str]], prompts: Path, types: dict) -> None:
    """``conf/data/billa_repo.yaml``'s layout (BiLLa's ``pretraining_corpora``)."""
    zh = [{"text": pairs[2 * i][0] + pairs[2 * i + 1][0]} for i in range(LM_FILES["zh"] * ZH_PER_FILE)]
    en = [{"text": en_text} for _, en_text in pairs[: LM_FILES["en"] * EN_PER_FILE]]
    translate = [{"en_text": e, "zh_text": z} for z, e in pairs[-LM_FILES["translate"] * TRANSLATE_PER_FILE :]]
    _spread(root, "zh", zh, LM_FILES["zh"], ZH_PER_FILE)
    _spread(root, "en", en, LM_FILES["en"], EN_PER_FILE)
    _spread(root, "translate", translate, LM_FILES["translate"], TRANSLATE_PER_FILE)
    for path in sorted((sample / "tasks" / "train").glob("*.jsonl")):
        _jsonl(root / path.stem / f"{FIRST_FILE}.jsonl", _shortest(_raw(path), TASK_RECORDS))
    for directory in sorted(p for p in (sample / "sft" / "train").iterdir() if p.is_dir()):
        records = [r for f in sorted(directory.iterdir()) for r in _shortest(_raw(f), SFT_RECORDS)]
        _jsonl(root / directory.name / f"{FIRST_FILE}.jsonl", records)
    for kind, stem in types.items():  # BiLLa names its prompt files by the record's `type`
        for placement in ("pre", "post"):
            if (prompts / f"{stem}.{placement}.prompt").is_file():
                (root / "prompts").mkdir(exist_ok=True)
                shutil.copyfile(prompts / f"{stem}.{placement}.prompt", root / "prompts" / f"{kind}.{placement}.prompt")
    for direction, billa_name in (("en2zh", "en-zh"), ("zh2en", "zh-en")):
        shutil.copyfile(prompts / f"translation.{direction}.prompt", root / "translate" / f"{billa_name}.prompt")


def _wudao(i: int, zh: str) -> dict:
    return {"id": i, "uniqueKey": f"rehearsal-{i:06d}", "titleUkey": f"rehearsal-t{i:06d}", "dataType": "百科",
            "title": f"第{i + 1}篇", "content": zh}  # fmt: skip


def _write_billa(root: Path, sample: Path, pairs: list[tuple[str, str]]) -> None:
    """``conf/data/billa.yaml``'s layout with WuDao 2.0's and PILE's file names."""
    docs = [_wudao(i, pairs[i][0]) for i in range(WUDAO_PARTS * WUDAO_PER_PART + 16)]
    for part in range(WUDAO_PARTS):  # WuDao 2.0's files are part-2021<6 digits>.json
        part_docs = docs[part * WUDAO_PER_PART : (part + 1) * WUDAO_PER_PART]
        _json(root / "wudao" / f"part-2021{278643 + 1931 * part:06d}.json", part_docs)
    _json(root / "wudao-val" / "part-2021009337.json", docs[-16:])
    sets = ("Pile-CC",) * 5 + ("Github",) * 2 + ("Wikipedia (en)",)  # per shard of 8 (PILE_PER_SHARD)

    def pile(i: int) -> dict:
        name = sets[i % PILE_PER_SHARD]
        text = f"def add_{i}(x):\n    return x + {i}\n" if name == "Github" else pairs[-1 - i][1]
        return {"text": text, "meta": {"pile_set_name": name}}

    for shard in range(PILE_SHARDS):
        records = [pile(shard * PILE_PER_SHARD + i) for i in range(PILE_PER_SHARD)]
        _jsonl_zst(root / "pile" / "train" / f"{shard:02d}.jsonl.zst", records)
    _jsonl_zst(root / "pile" / "val.jsonl.zst", [pile(PILE_SHARDS * PILE_PER_SHARD + i) for i in range(16)])
    translate = [{"en_text": e, "zh_text": z} for z, e in pairs[1000:1250]]
    _jsonl(root / "translation" / "wmt19-en-zh-00.jsonl", translate[:125])
    _jsonl(root / "translation" / "wmt19-en-zh-01.jsonl", translate[125:])
    for path in sorted((sample / "tasks" / "train").glob("*.jsonl")):
        _jsonl(root / "tasks" / path.name, _shortest(_raw(path), TASK_RECORDS))
    for directory in sorted(p for p in (sample / "sft" / "train").iterdir() if p.is_dir()):
        files = sorted(directory.iterdir())
        records = [r for f in files for r in _shortest(_raw(f), SFT_RECORDS)]
        if directory.name == "others":  # a directory of files in several formats, as BiLLa's "others"
            for f in files:
                write = _json if f.suffix == ".json" else _jsonl
                write(root / "sft" / "others" / f.name, _shortest(_raw(f), SFT_RECORDS))
        elif directory.name == "code-alpaca-en":  # Code Alpaca ships one JSON array
            _json(root / "sft" / "code-alpaca-en.json", records)
        else:
            _jsonl(root / "sft" / f"{directory.name}.jsonl", records)


def build_rehearsal_corpus(out_dir: str | os.PathLike, sample_dir: str | os.PathLike | None = None) -> dict:
    """Write the rehearsal corpus (both layouts and the tokenizer) under ``out_dir`` unless it is already there.

    Args:
        out_dir: where ``billa_repo/``, ``billa/`` and ``tokenizer/`` go.
        sample_dir: the embedded sample's cache (corpus and tokenizer, built there on first use); default
            ``$BILLA_CACHE_DIR/sample`` (``~/.cache/billa/sample``), the tiny default's, so they are built once.

    Returns:
        Files per layout, also stored in ``rehearsal.json``, written last (an interrupted build is redone).
    """
    from billa.sample.tokenizer import sample_tokenizer

    out = Path(out_dir)
    manifest = out / _MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("version") == _VERSION:
        return json.loads(manifest.read_text())["files"]
    default_cache = Path(os.environ.get("BILLA_CACHE_DIR", Path.home() / ".cache" / "billa"))
    sample_cache = Path(sample_dir) if sample_dir else default_cache / "sample"
    sample = sample_cache / "corpus"
    build_sample_corpus(sample)
    tokenizer = sample_tokenizer(sample_cache)
    pairs = _sentences(sample)
    prompts = Path(__file__).resolve().parents[3] / "conf" / "prompts"
    from omegaconf import OmegaConf

    types = OmegaConf.load(Path(__file__).resolve().parents[3] / "conf" / "train.yaml").data.prompt_types
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_billa_repo(tmp / "billa_repo", sample, pairs, prompts, dict(types))
    _write_billa(tmp / "billa", sample, pairs)
    shutil.copytree(tokenizer, tmp / "tokenizer")
    files = {layout: sum(1 for p in (tmp / layout).rglob("*") if p.is_file()) for layout in ("billa_repo", "billa")}
    (tmp / _MANIFEST).write_text(json.dumps({"version": _VERSION, "files": files}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m billa.sample.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where billa_repo/, billa/ and tokenizer/ are written")
    parser.add_argument("--sample-dir", default=None, help="the embedded sample's cache (default: the tiny default's)")
    args = parser.parse_args(argv)
    from rich.console import Console  # the command's own report on stdout, as the mask inspector prints its samples

    console = Console(soft_wrap=True)
    files = build_rehearsal_corpus(args.out_dir, args.sample_dir)
    root = Path(args.out_dir).resolve()
    console.print(f"Rehearsal corpus in {root}: {files}")
    for data in ("billa_repo", "billa"):
        console.print(f"  python train.py stage=pretrain model=llama-7b data={data} hardware=8xa100 "
                      f"+experiment=rehearsal data.root={root / data}")  # fmt: skip


if __name__ == "__main__":
    main()
