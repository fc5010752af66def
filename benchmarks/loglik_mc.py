"""Log-likelihood multiple choice: billa's batched scorer against a naive loop, same scores, in one run.

The naive loop is what a first implementation does: one forward pass per (prompt, option) pair with the full
log-softmax over every position. billa's ``EvalLM.loglikelihood`` batches the pairs (``--batch-size``), takes the
log-softmax only at the option's positions and runs each question's shared prompt once (its key/value cache serves
every option); the middle row shows batching without the shared prompt. Both score the same lm-evaluation-harness
encoding (prompt + " " + option as one string). Items: the shipped LogiQA 2.0 and C3 fixtures, repeated. Model: the
tiny default's architecture (random init) with the sample tokenizer, or ``--model-path``. Each contender runs
``--repeats`` times alternately; the median is compared. Prints options/s, the ratio and the largest score difference.

    python benchmarks/loglik_mc.py [--repeat-items 8] [--batch-size 32] [--model-path outputs/sft/<date>/hf]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from billa.evaluate.lm import EvalLM, load_lm  # noqa: E402
from billa.evaluate.multiple_choice import load_items, render  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
PROMPT = "{passage}\n问题：{question}\n答案："


def tiny_export(out: Path) -> Path:
    """model=tiny's architecture, random init, with the sample tokenizer (built offline on first use)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from transformers import AutoTokenizer, LlamaForCausalLM

    from billa.export import save_hf_model
    from billa.model.builders import llama_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train")
    instantiate(cfg.data.build)
    tokenizer_dir = instantiate(cfg.model.tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(cfg.model.architecture, len(AutoTokenizer.from_pretrained(tokenizer_dir))))
    return Path(save_hf_model(model, tokenizer_dir, out))


@torch.no_grad()
def naive(lm: EvalLM, requests: list[tuple[str, str]]) -> list[float]:
    """One forward pass per (prompt, option), full log-softmax, same token split as lm-evaluation-harness."""
    scores = []
    for context, continuation in requests:
        ctx, cont = lm.encode_pair(context, continuation)
        ids = torch.tensor([(ctx + cont)[:-1]], device=lm.device)
        logprobs = F.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
        target = torch.tensor(cont, device=lm.device)
        scores.append(float(logprobs[-len(cont) :].gather(1, target[:, None]).sum()))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None, help="HF model directory (default: a random tiny model)")
    parser.add_argument("--repeat-items", type=int, default=8, help="copies of the 22 fixture items")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_path or tiny_export(Path(tmp) / "hf")
        lm = load_lm(path, batch_size=args.batch_size)
    items = [
        item
        for name, ds in (
            ("logiqa2-en-test.txt", "logiqa2"),
            ("logiqa2-zh-test.txt", "logiqa2"),
            ("c3-d-dev.json", "c3"),
            ("c3-m-dev.json", "c3"),
        )
        for item in load_items(f"fixtures://{name}", ds, name)
    ] * args.repeat_items
    requests = [(render(PROMPT, item), " " + option) for item in items for option in item.options]
    lengths = [len(sum(lm.encode_pair(c, k), [])) for c, k in requests]
    print(
        f"{len(items)} items, {len(requests)} options, {statistics.mean(lengths):.0f} tokens per sequence on "
        f"average, {torch.get_num_threads()} threads, {lm.device}"
    )
    naive(lm, requests[:4]), lm.loglikelihood(requests[:4])  # warm-up
    times: dict[str, list[float]] = {"naive": [], "batched": [], "billa": []}
    scores: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name in times:
            lm.share_prefix = name == "billa"
            start = time.perf_counter()
            scores[name] = naive(lm, requests) if name == "naive" else [s for s, _ in lm.loglikelihood(requests)]
            times[name].append(time.perf_counter() - start)
    rate = {name: len(requests) / statistics.median(t) for name, t in times.items()}
    diff = {name: max(abs(a - b) for a, b in zip(scores["naive"], scores[name], strict=True)) for name in scores}
    print(f"naive loop (1 option per forward):             {rate['naive']:8.1f} options/s")
    print(
        f"batched, no prefix sharing (batch {args.batch_size}):    {rate['batched']:8.1f} options/s  "
        f"({rate['batched'] / rate['naive']:.2f}x, max |diff| {diff['batched']:.1e})"
    )
    print(
        f"billa: batched + shared question prefix (batch {args.batch_size}): {rate['billa']:8.1f} options/s  "
        f"({rate['billa'] / rate['naive']:.2f}x, max |diff| {diff['billa']:.1e})"
    )
    print(f"speed-up: {rate['billa'] / rate['naive']:.2f}x   max |score difference| = {diff['billa']:.2e} nats")


if __name__ == "__main__":
    main()
