"""Streaming tokenisation: seconds to the first optimizer step against corpus size, cache bytes a token, tokens/s.

Stream sources (``billa.data.stream``) are tokenised piece by piece while the stage trains, so the first step should
wait for one ~4 MiB piece of each source, whatever the corpus size. For each size this script

1. writes a ``conf/data/billa.yaml`` layout (``--grow en``, the default: only PILE grows with the size):
   - ``pile/train/NN.jsonl.zst``: ``--shards`` zstd shards of unique PILE-format documents (``{"text", "meta":
     {"pile_set_name": "Pile-CC"}}``) whose decompressed size adds up to the size, as PILE's ``00.jsonl.zst`` ...;
     ``pile/val.jsonl.zst``;
   - ``wudao/part-2021NNNNNN.json``: WuDao 2.0 JSON arrays, ``--fixed-mb`` MB in all, and ``wudao-val/``;
   - ``translation/wmt19-en-zh-NN.jsonl``: ``{"en_text", "zh_text"}`` pairs, ``--fixed-mb`` MB in all;
   ``--grow all`` grows the three with the size instead (4:4:2 like the stage-1 mix: en 40 %, zh 40 %, translate 20 %).
   The text comes from the embedded sample corpus (``billa.sample.corpus``): each document is a numbered
   combination of its paragraphs, so every document is unique and the tokenizer sees ordinary English (Chinese);
2. runs the real entry point in a fresh token cache::

       python train.py stage=pretrain data=billa data.root=<corpus> model=tiny hardware=cpu logger=none scale=sample \
           trainer.max_steps=<steps> scheduler.warmup_steps=1 val_every_n_steps=1000 checkpoint.every_n_steps=1000 \
           progress=text trainer.log_every_n_steps=1 export.verify=false data.num_proc=<n> \
           data.token_cache_dir=<fresh> hydra.run.dir=<tmp>

   and times, from the process start, the datamodule's ``Data:`` line (setup done: every stream source has its first
   piece) and the text progress line ``step 1/<steps>`` (the first optimizer step done; validation at step 0 comes
   before it); the trainer's consumption is the median ``tok/s`` of the later step lines. ``--repeats`` runs each
   size again, in alternating order, and the goal compares medians; the 1-minute load average at each run's start
   and end is printed (on a shared machine it, not the corpus, often decides the seconds). Each run prints when
   every file's first and last finished piece appeared, which shows the order the feeder tokenised them in;
3. reads the stream cache's finished pieces (``<cache>/<source>/<key>/stream-N/<file id>/NNNNN.arrow`` with their
   ``NNNNN.json`` markers): Arrow bytes / stored tokens (``ids``; translation ``a`` + ``b`` + explicit variants),
   and the feeder's rate inside the run (stored tokens of a file's later pieces over the time between its markers:
   one worker, sharing the 2 cores with the trainer).

Once per invocation, ``stream.tokenise_file`` runs in this process, on one core (``TOKENIZERS_PARALLELISM=false``),
on a ``--probe-mb`` PILE shard, a WuDao file and a translation file of a quarter of that: the clean stored tokens/s
per core of each source, and of stage 1's mix (10 samples: 4 zh, 4 en and 2 translate rows of the measured lengths,
over the time their tokenisation takes). The extrapolation to BiLLa's stage 1 on one 8-GPU node: 8 cores x the mix's
rate against the ~30,000 tokens/s LLaMA-7B consumes on 8xA100.

Goals (PASS/FAIL): seconds to step 1 of the largest size within 1.5x the smallest's; <= 2.5 cache bytes a token,
every source; 8 cores' tokenisation ahead of 30,000 tokens/s.

    python benchmarks/stream_startup.py [--sizes 50 200 1000] [--steps 4] [--num-proc 2] [--grow en|all] [--repeats 1]
    python benchmarks/stream_startup.py --sizes 5 20          # a smoke run, ~3 minutes on a quiet 2-core machine

Run from the repository root; the tiny model's SentencePiece tokenizer (3.5k pieces, ``billa.sample.tokenizer``)
stands in for LLaMA's: it cuts English into more, shorter tokens than LLaMA's 46,943-piece vocabulary would.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core: the per-core rate the pool multiplies

import pyarrow as pa  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000
TARGET_7B = 30_000  # tokens/s LLaMA-7B consumes on one 8xA100 node (BiLLa's stage 1)
NODE_CORES = 8
GOAL_STARTUP_RATIO = 1.5
GOAL_BYTES_PER_TOKEN = 2.5
TOK_S = re.compile(r"([\d,]+) tok/s")


# ---- the corpora ---------------------------------------------------------------------------------------------------
class Text:
    """The embedded sample's paragraphs, combined into unique documents."""

    def __init__(self, cache: Path):
        from billa.sample.corpus import build_sample_corpus, sample_texts
        from billa.sample.rehearsal import _sentences

        build_sample_corpus(cache / "corpus")
        self.zh, self.en = sample_texts(cache / "corpus")
        self.pairs = _sentences(cache / "corpus")  # (zh, en) sentence pairs

    def en_doc(self, i: int) -> str:
        n = len(self.en)
        return f"Document {i}.\n" + "\n".join(self.en[(i * 13 + k * k * 7 + k + i // n) % n] for k in range(9))

    def zh_doc(self, i: int) -> str:
        n = len(self.zh)
        return "".join(self.zh[(i * 11 + k * k * 5 + k + i // n) % n] for k in range(12))

    def pair(self, i: int) -> tuple[str, str]:
        n = len(self.pairs)
        chosen = [self.pairs[(i * 7 + k * 3 + i // n) % n] for k in range(2)]
        return f"({i}) " + " ".join(e for _, e in chosen), f"（{i}）" + "".join(z for z, _ in chosen)


def pile_line(text: str) -> bytes:
    return (json.dumps({"text": text, "meta": {"pile_set_name": "Pile-CC"}}, ensure_ascii=False) + "\n").encode()


def write_zst_shard(path: Path, make, first: int, size: int) -> int:
    """Documents ``first, first + 1, ...`` (``make(i)`` -> one line of bytes) until ``size`` bytes; the next index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    i, written = first, 0
    with pa.output_stream(str(path), compression="zstd") as stream:
        while written < size:
            block = []
            block_bytes = 0
            while block_bytes < (1 << 22) and written + block_bytes < size:
                line = make(i)
                block.append(line)
                block_bytes += len(line)
                i += 1
            stream.write(b"".join(block))
            written += block_bytes
    return i


def write_wudao(path: Path, text: Text, first: int, size: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    docs, total, i = [], 0, first
    while total < size:
        doc = {"id": i, "uniqueKey": f"bench-{i:08d}", "titleUkey": f"bench-t{i:08d}", "dataType": "百科",
               "title": f"第{i + 1}篇", "content": text.zh_doc(i)}  # fmt: skip
        docs.append(doc)
        total += len(json.dumps(doc, ensure_ascii=False).encode()) + 2
        i += 1
    path.write_text(json.dumps(docs, ensure_ascii=False, indent=1), encoding="utf-8")
    return i


def write_translation(path: Path, text: Text, first: int, size: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    total, i = 0, first
    with open(path, "wb") as handle:
        while total < size:
            en, zh = text.pair(i)
            line = (json.dumps({"en_text": en, "zh_text": zh}, ensure_ascii=False) + "\n").encode()
            handle.write(line)
            total += len(line)
            i += 1
    return i


def write_corpus(root: Path, text: Text, size_mb: float, shards: int, grow: str, fixed_mb: float) -> dict:
    """The ``conf/data/billa.yaml`` layout under ``root``; bytes written per source (decompressed)."""
    total = size_mb * MB
    if grow == "en":
        sizes = {"en": total, "zh": fixed_mb * MB, "translate": fixed_mb * MB}
    else:
        sizes = {"en": 0.4 * total, "zh": 0.4 * total, "translate": 0.2 * total}
    files = {"en": shards, "zh": 2 if grow == "en" else shards, "translate": 2 if grow == "en" else shards}
    make_en = lambda i: pile_line(text.en_doc(i))  # noqa: E731
    i = 0
    for shard in range(files["en"]):
        i = write_zst_shard(root / "pile" / "train" / f"{shard:02d}.jsonl.zst", make_en, i, sizes["en"] / files["en"])
    write_zst_shard(root / "pile" / "val.jsonl.zst", make_en, 10**9, 16 * 3000)
    i = 0
    for part in range(files["zh"]):  # WuDao 2.0's names: part-2021NNNNNN.json
        i = write_wudao(
            root / "wudao" / f"part-2021{278643 + 1931 * part:06d}.json", text, i, sizes["zh"] / files["zh"]
        )
    write_wudao(root / "wudao-val" / "part-2021009337.json", text, 10**9, 16 * 1500)
    i = 0
    for part in range(files["translate"]):
        name = f"wmt19-en-zh-{part:02d}.jsonl"
        i = write_translation(root / "translation" / name, text, i, sizes["translate"] / files["translate"])
    return {name: int(size) for name, size in sizes.items()}


# ---- the run -------------------------------------------------------------------------------------------------------
def run_train(corpus: Path, cache: Path, run_dir: Path, steps: int, num_proc: int, timeout: float, log_path: Path):
    """Run train.py: seconds to the ``step 1/`` line and to the datamodule's ``Data:`` line (the stream sources' first
    pieces are there), the step lines [(step, seconds, tok/s)], exit code, seconds in all, wall-clock start."""
    command = [
        sys.executable, "train.py", "stage=pretrain", "data=billa", f"data.root={corpus}", "model=tiny",
        "hardware=cpu", "logger=none", "scale=sample", f"trainer.max_steps={steps}", "scheduler.warmup_steps=1",
        "val_every_n_steps=1000", "checkpoint.every_n_steps=1000", "progress=text", "trainer.log_every_n_steps=1",
        "export.verify=false", f"data.num_proc={num_proc}", f"data.token_cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p),
    }
    start, wall_start = time.perf_counter(), time.time()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    first_step, data_ready, lines = None, None, []
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        for line in proc.stdout:
            now = time.perf_counter() - start
            log.write(f"[+{now:8.2f}s] {line}")
            log.flush()
            if data_ready is None and "billa.data.datamodule" in line and "Data: {" in line:
                data_ready = now  # setup done: every stream source has its first piece
            match = re.search(r"\bstep (\d+)/(\d+)\b", line)
            if match and "validation" not in line:
                step = int(match.group(1))
                rate = TOK_S.search(line)
                lines.append((step, now, float(rate.group(1).replace(",", "")) if rate else None))
                if step >= 1 and first_step is None:
                    first_step = now
    code = proc.wait()
    timer.cancel()
    return {"first_step_s": first_step, "data_ready_s": data_ready, "lines": lines, "exit": code,
            "run_s": time.perf_counter() - start, "wall_start": wall_start, "command": command}  # fmt: skip


def count_tokens(table: pa.Table) -> int:
    total = 0
    for name in ("ids", "a", "b"):
        if name in table.column_names:
            total += sum(len(chunk.values) for chunk in table.column(name).chunks)
    if "explicit" in table.column_names:  # rows whose prompt parts are kept per variant: [len, prefix..., target...]
        for chunk in table.column("explicit").chunks:
            total += len(chunk.values.values) - len(chunk.values)
    return total


def corpus_files(corpus: Path) -> dict[str, str]:
    """Stream cache folder name (``stream.stream_file_id``) -> ``source/file name`` of every train file."""
    from billa.data.stream import stream_file_id

    sources = {"en": "pile/train/*.jsonl.zst", "zh": "wudao/*.json", "translate": "translation/*.jsonl"}
    return {stream_file_id(str(p)): f"{name}/{p.name}" for name, g in sources.items() for p in sorted(corpus.glob(g))}


def read_cache(cache: Path, names: dict[str, str], wall_start: float) -> dict:
    """Per source: finished pieces, their Arrow bytes and stored tokens, rows kept explicit (translation), the
    feeder's in-run rate per worker, and per file the seconds (after the process start) its first and last finished
    pieces appeared."""
    from billa.data.stream import STREAM_FORMAT

    found = {}
    for stream_dir in sorted(cache.glob(f"*/*/{STREAM_FORMAT}")):
        source = stream_dir.parents[1].name
        entry = found.setdefault(
            source, {"pieces": 0, "bytes": 0, "tokens": 0, "rows": 0, "explicit": 0, "rates": [], "files": {}}
        )
        for file_dir in sorted(p for p in stream_dir.iterdir() if p.is_dir()):
            timed = []
            for marker in sorted(file_dir.glob("[0-9]*.json")):
                info = json.loads(marker.read_text())
                arrow = marker.with_suffix(".arrow")
                if info.get("rows") is None or not arrow.is_file():
                    continue
                with pa.memory_map(str(arrow)) as source_file:
                    table = pa.ipc.open_stream(source_file).read_all()
                tokens = count_tokens(table)
                entry["pieces"] += 1
                entry["bytes"] += arrow.stat().st_size
                entry["tokens"] += tokens
                entry["rows"] += table.num_rows
                if "explicit" in table.column_names:
                    entry["explicit"] += table.num_rows - table.column("explicit").null_count
                timed.append((marker.stat().st_mtime, tokens))
            if not timed:
                continue
            timed.sort()
            name = names.get(file_dir.name, file_dir.name)
            entry["files"][name] = (len(timed), timed[0][0] - wall_start, timed[-1][0] - wall_start,
                                    (file_dir / "done.json").is_file())  # fmt: skip
            if len(timed) >= 2 and timed[-1][0] > timed[0][0]:
                entry["rates"].append(sum(t for _, t in timed[1:]) / (timed[-1][0] - timed[0][0]))
    return found


MIX = {"zh": 4, "en": 4, "translate": 2}  # stage 1's samples per 10 (conf/stage/pretrain.yaml)


def probe_rates(text: Text, tokenizer_dir: str, work: Path, en_mb: float) -> dict:
    """``stream.tokenise_file`` in this process, one core, per source: a ``en_mb`` PILE shard, a WuDao JSON array and
    a translation file of a quarter of that; stored tokens/s of each."""
    from billa.data.datamodule import DEFAULT_PROMPTS_DIR
    from billa.data.objectives import load_prompts
    from billa.data.stream import tokenise_file
    from billa.data.tokenise import ObjectiveSettings, _Worker, tokenizer_spec
    from billa.tokenizer.load import load_tokenizer

    root = work / "probe"
    small = en_mb / 4
    # data=billa's sources as the datamodule builds their settings (stage 1: 1,024 tokens, seed 42)
    probes = {
        "en": (ObjectiveSettings("en", "pile", "conditional_generation", 1024, 42, False,
                                 (("pile_sets", ("Pile-CC", "Github")),)),
               root / "00.jsonl.zst", en_mb,
               lambda p, mb: write_zst_shard(p, lambda i: pile_line(text.en_doc(i)), 5 * 10**8, mb * MB)),
        "zh": (ObjectiveSettings("zh", "wudao", "conditional_generation", 1024, 42, False),
               root / "part-2021000000.json", small, lambda p, mb: write_wudao(p, text, 5 * 10**8, mb * MB)),
        "translate": (ObjectiveSettings("translate", "translation", "translation", 1024, 42, False),
                      root / "wmt19-en-zh-99.jsonl", small,
                      lambda p, mb: write_translation(p, text, 5 * 10**8, mb * MB)),
    }  # fmt: skip
    worker = _Worker(tokenizer_spec(load_tokenizer(tokenizer_dir)), load_prompts(str(DEFAULT_PROMPTS_DIR)))
    worker.encode(["warm-up " * 50])
    found = {}
    for name, (settings, path, mb, write) in probes.items():
        write(path, mb)
        out = root / f"pieces-{name}"
        start = time.perf_counter()
        result = tokenise_file(str(path), settings, str(out), worker=worker)
        seconds = time.perf_counter() - start
        stats = read_cache_dir(out)
        found[name] = {"mb": mb, "seconds": seconds, "pieces": result["pieces"], **stats,
                       "tokens_per_s": stats["tokens"] / seconds, "mb_per_s": mb / seconds}  # fmt: skip
    # the mix's rate: tokens of 10 samples (4 zh, 4 en, 2 translate rows of the sizes measured) over their time
    tokens = sum(MIX[n] * f["tokens"] / f["rows"] for n, f in found.items())
    seconds = sum(MIX[n] * f["tokens"] / f["rows"] / f["tokens_per_s"] for n, f in found.items())
    found["mix"] = {"tokens_per_s": tokens / seconds}
    return found


def read_cache_dir(directory: Path) -> dict:
    tokens = nbytes = rows = 0
    for arrow in sorted(directory.glob("*.arrow")):
        with pa.memory_map(str(arrow)) as source_file:
            table = pa.ipc.open_stream(source_file).read_all()
        tokens += count_tokens(table)
        nbytes += arrow.stat().st_size
        rows += table.num_rows
    return {"tokens": tokens, "bytes": nbytes, "rows": rows}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ",.0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[50, 200, 1000], help="decompressed corpus MB")
    parser.add_argument("--shards", type=int, default=4, help="PILE shards per corpus (NN.jsonl.zst)")
    parser.add_argument("--grow", choices=("en", "all"), default="en", help="which sources grow with the size")
    parser.add_argument("--fixed-mb", type=float, default=4.0, help="--grow en: MB of zh and of translate")
    parser.add_argument("--steps", type=int, default=4, help="trainer.max_steps of each run")
    parser.add_argument("--num-proc", type=int, default=2, help="data.num_proc")
    parser.add_argument("--probe-mb", type=float, default=16.0, help="MB of the in-process tokenise_file probe")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (medians reported)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take before it is killed")
    parser.add_argument("--work", type=Path, help="where corpora, caches and logs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and caches (default: delete each)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from billa.sample.tokenizer import sample_tokenizer

    sample = Path(os.environ.get("BILLA_CACHE_DIR", Path.home() / ".cache" / "billa")) / "sample"
    tokenizer_dir = str(sample_tokenizer(sample))  # built once, outside the timed runs (model=tiny's cache)
    text = Text(sample)
    work = args.work or Path(tempfile.mkdtemp(prefix="billa-stream-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; {os.cpu_count()} CPUs; {datetime.datetime.now().isoformat(timespec='seconds')}")

    probes = probe_rates(text, tokenizer_dir, work, args.probe_mb)
    print("tokenise_file in this process, one core:")
    for name, probe in probes.items():
        if name == "mix":
            print(f"  stage 1's mix (4 zh : 4 en : 2 translate rows): {probe['tokens_per_s']:,.0f} tokens/s")
            continue
        print(f"  {name}: {probe['mb']:g} MB, {probe['pieces']} pieces, {probe['rows']:,} rows, {probe['tokens']:,} "
              f"tokens ({probe['tokens'] / probe['rows']:.0f} a row) in {probe['seconds']:.1f} s = "
              f"{probe['tokens_per_s']:,.0f} tokens/s ({probe['mb_per_s']:.2f} MB/s), "
              f"{probe['bytes'] / probe['tokens']:.3f} bytes a token", flush=True)  # fmt: skip
    per_core = probes["mix"]["tokens_per_s"]
    if not args.keep:
        shutil.rmtree(work / "probe", ignore_errors=True)

    corpora = {}
    for size in args.sizes:  # written once, kept while the runs go on (a 1 GB corpus is ~70 MB of zstd)
        tag = f"{size:g}MB"
        corpus = work / tag / "corpus"
        shutil.rmtree(work / tag, ignore_errors=True)
        start = time.perf_counter()
        written = write_corpus(corpus, text, size, args.shards, args.grow, args.fixed_mb)
        compressed = sum(p.stat().st_size for p in (corpus / "pile" / "train").glob("*.zst"))
        print(f"[{tag}] corpus written in {time.perf_counter() - start:.1f} s: {written} bytes decompressed, "
              f"PILE shards {compressed / MB:.1f} MB compressed", flush=True)  # fmt: skip
        corpora[size] = (corpus, written)

    results = []
    for repeat in range(args.repeats):  # sizes alternate ascending / descending: a trend in the load cancels out
        for size in args.sizes if repeat % 2 == 0 else list(reversed(args.sizes)):
            tag = f"{size:g}MB"
            corpus, written = corpora[size]
            cache, run_dir = work / tag / f"cache-{repeat}", work / tag / f"run-{repeat}"
            log_path = work / f"{tag}-{repeat}.log"
            load = os.getloadavg()[0]
            run = run_train(corpus, cache, run_dir, args.steps, args.num_proc, args.timeout, log_path)
            run.update(size=size, written=written, log=str(log_path), load=(load, os.getloadavg()[0]))
            run["cache"] = read_cache(cache, corpus_files(corpus), run["wall_start"])
            run["consumed_tok_s"] = median([rate for step, _, rate in run["lines"] if step >= 2])
            results.append(run)
            print(f"[{tag} #{repeat}] exit {run['exit']}: data ready at {fmt(run['data_ready_s'], '.1f')} s, step 1 "
                  f"at {fmt(run['first_step_s'], '.1f')} s, run {run['run_s']:.1f} s, load average {load:.1f} -> "
                  f"{run['load'][1]:.1f} (1 min, {os.cpu_count()} CPUs), log {log_path}", flush=True)  # fmt: skip
            for _, entry in sorted(run["cache"].items()):
                for file_name, (pieces, first, last, done) in sorted(entry["files"].items()):
                    print(f"    {file_name}: {pieces} pieces{' (whole file)' if done else ''}, first at {first:.1f} s, "
                          f"last at {last:.1f} s")  # fmt: skip
            if run["exit"] != 0 or run["first_step_s"] is None:
                print(f"[{tag}] the run failed or never reached step 1; last lines of {log_path}:")
                print("".join(log_path.read_text().splitlines(keepends=True)[-40:]))
            if not args.keep:
                shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(run_dir, ignore_errors=True)
    if not args.keep:
        for size in args.sizes:
            shutil.rmtree(work / f"{size:g}MB", ignore_errors=True)

    print()
    print(f"Command of each run (<size> = the size's folder): {' '.join(results[-1]['command'][1:])}")
    grown = "only en grows" if args.grow == "en" else "en, zh, translate grow 4:4:2"
    print(f"Sizes: decompressed MB (--grow {args.grow}: {grown}); {args.shards} PILE shards; "
          f"trainer.max_steps={args.steps}; data.num_proc={args.num_proc}")  # fmt: skip
    print(
        "| size MB | load | s to data ready | s to step 1 | trainer tok/s | source | pieces done (files) | cache MB "
        "| stored tokens | bytes/token | feeder tok/s per worker, in the run |"
    )
    print("| --- " * 11 + "|")
    for run in results:
        head = (f"| {run['size']:g} | {max(run['load']):.1f} | {fmt(run['data_ready_s'], '.1f')} "
                f"| {fmt(run['first_step_s'], '.1f')} "
                f"| {fmt(run['consumed_tok_s'])} ")  # fmt: skip
        for name, entry in sorted(run["cache"].items()):
            bpt = entry["bytes"] / entry["tokens"] if entry["tokens"] else None
            explicit = f", {entry['explicit']} explicit rows" if name == "translate" else ""
            print(f"{head}| {name} | {entry['pieces']} ({len(entry['files'])}) | {entry['bytes'] / MB:.1f} "
                  f"| {entry['tokens']:,}{explicit} | {fmt(bpt, '.3f')} | {fmt(median(entry['rates']))} |")  # fmt: skip
    per_source: dict[str, list] = {}
    for run in results:
        for name, entry in run["cache"].items():
            per_source.setdefault(name, [0, 0])
            per_source[name][0] += entry["bytes"]
            per_source[name][1] += entry["tokens"]
    ratios = {name: b / t for name, (b, t) in per_source.items() if t}
    node = NODE_CORES * per_core
    print()
    print(
        f"Extrapolation, BiLLa stage 1 on one 8-GPU node: {NODE_CORES} cores x {per_core:,.0f} tokens/s (the mix) "
        f"= {node:,.0f} tokens/s tokenised against ~{TARGET_7B:,} consumed by LLaMA-7B ({node / TARGET_7B:.0f}x); "
        f"the trainer here (tiny model, 2-core CPU) consumed {fmt(median([r['consumed_tok_s'] for r in results]))} "
        "tokens/s"
    )
    ok_runs = all(r["exit"] == 0 and r["first_step_s"] is not None for r in results)
    firsts = [median([r["first_step_s"] for r in results if r["size"] == size]) for size in args.sizes]
    ready = [median([r["data_ready_s"] for r in results if r["size"] == size]) for size in args.sizes]
    ratio = firsts[-1] / firsts[0] if ok_runs else None
    print(f"Median over {args.repeats} run(s) per size: " + ", ".join(
        f"{size:g} MB: data ready {fmt(r, '.1f')} s, step 1 {fmt(f, '.1f')} s"
        for size, r, f in zip(args.sizes, ready, firsts, strict=True)))  # fmt: skip
    worst = max(ratios.values()) if ratios else None
    goals = [
        (f"seconds to step 1, {args.sizes[-1]:g} MB vs {args.sizes[0]:g} MB within {GOAL_STARTUP_RATIO}x",
         ok_runs and ratio <= GOAL_STARTUP_RATIO,
         f"{fmt(firsts[-1], '.1f')} s / {fmt(firsts[0], '.1f')} s = {fmt(ratio, '.2f')}x"),
        (f"cache <= {GOAL_BYTES_PER_TOKEN} bytes a token, every source",
         worst is not None and worst <= GOAL_BYTES_PER_TOKEN,
         ", ".join(f"{name} {value:.3f}" for name, value in sorted(ratios.items()))),
        (f"{NODE_CORES} cores' tokenisation ahead of {TARGET_7B:,} tokens/s", node > TARGET_7B,
         f"{node:,.0f} tokens/s ({node / TARGET_7B:.0f}x)"),
    ]  # fmt: skip
    for name, ok, figure in goals:
        print(f"{'PASS' if ok else 'FAIL'}: {name}: {figure}")
    print(f"run logs: {work}/*.log")


if __name__ == "__main__":
    main()
