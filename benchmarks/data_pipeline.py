"""Data pipeline speed: loader tokens/s from the tokenised cache on one core, and the tokenisation pass.

1. Loader: MixedDataset over the Arrow cache -> StreamSampler -> DataLoader (no workers) -> PadCollator, one thread.
   Compared with what LLaMA-7B on 8xA100 consumes (~30,000 tokens/s; goal >= 50x that).
2. Tokenisation pass (billa.data.cache.tokenize_source, one process, fresh cache) against bare batched
   fast-tokenizer encoding of the same texts in the same run (goal >= 0.8x its speed).

The corpus: the sample corpus's English and Chinese documents joined into ~1,000-token PILE-format documents
(BiLLa trains at 1,024 tokens), written to a temporary directory.

    python benchmarks/data_pipeline.py [--docs 2000] [--batches 300]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from billa.data.cache import ObjectiveSettings, tokenize_source  # noqa: E402
from billa.data.collate import PadCollator  # noqa: E402
from billa.data.datamodule import DEFAULT_PROMPTS_DIR  # noqa: E402
from billa.data.mixing import MixedDataset, StreamSampler  # noqa: E402
from billa.sample.corpus import build_sample_corpus, sample_texts  # noqa: E402
from billa.sample.tokenizer import sample_tokenizer  # noqa: E402
from billa.tokenizer.load import load_tokenizer  # noqa: E402

TARGET_7B = 30_000  # tokens/s that LLaMA-7B on 8xA100 consumes


def make_corpus(cache: Path, out: Path, docs: int) -> list[str]:
    build_sample_corpus(cache / "corpus")
    zh, en = sample_texts(cache / "corpus")
    pool = zh + en
    # every document is unique (its number first), so no tokenizer-side caching or de-duplication can help
    texts = [f"Document {i}.\n" + "\n".join(pool[(i * 12 + k) % len(pool)] for k in range(12)) for i in range(docs)]
    with open(out, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text, "meta": {"pile_set_name": "Pile-CC"}}, ensure_ascii=False) + "\n")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    cache = Path(os.environ.get("BILLA_CACHE_DIR", Path.home() / ".cache" / "billa")) / "sample"
    tokenizer_dir = sample_tokenizer(cache)
    tokenizer = load_tokenizer(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pile.jsonl"
        texts = make_corpus(cache, corpus, args.docs)
        settings = ObjectiveSettings("en", "pile", "conditional_generation", 1024, 0, False)

        tokenizer(texts[:200], add_special_tokens=False)  # warm-up
        start = time.perf_counter()
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        bare = time.perf_counter() - start
        n_tokens = sum(len(ids) for ids in encoded)

        start = time.perf_counter()
        dataset, stats = tokenize_source(
            str(corpus), settings, tokenizer_dir, str(DEFAULT_PROMPTS_DIR), Path(tmp) / "cache", num_proc=1
        )
        ours = time.perf_counter() - start
        print(f"corpus: {len(texts)} documents, {n_tokens:,} tokens ({n_tokens / len(texts):.0f} per document)")
        print(
            f"tokenisation: bare batched fast tokenizer {n_tokens / bare:,.0f} tokens/s; billa's pass (read + "
            f"objective + Arrow shard) {n_tokens / ours:,.0f} tokens/s -> {bare / ours:.2f}x (goal >= 0.8)"
        )

        torch.set_num_threads(1)
        data = MixedDataset({"en": dataset}, {"en": 1}, num_samples=args.batches * 20, seed=0)
        loader = DataLoader(
            data, batch_size=20, sampler=StreamSampler(len(data), block=20), collate_fn=PadCollator(0), num_workers=0
        )
        start, tokens = time.perf_counter(), 0
        for batch in loader:
            tokens += sum(batch["sample_tokens"])
        rate = tokens / (time.perf_counter() - start)
        print(
            f"loader: {rate:,.0f} tokens/s on one core (batches of 20 x <=1024) = {rate / TARGET_7B:.1f}x what "
            f"LLaMA-7B on 8xA100 consumes (~{TARGET_7B:,} tokens/s; goal >= 50x)"
        )


if __name__ == "__main__":
    main()
