"""Peak memory of one training step: billa's chunked loss over label positions against HF Trainer's step.

HF Trainer's step is ``model(input_ids, attention_mask, labels).loss`` then backward (``Trainer.compute_loss``):
(B, T, V) logits, upcast to fp32 inside the loss, and their gradient. billa's step is ``BillaLM.model_step``: lm_head
and cross-entropy over label positions in chunks of ``loss_chunk_tokens``. Both then take an AdamW step. Each
contender runs in its own process (a fresh allocator), on fully labelled rows (the case least favourable to billa:
no masked positions to skip). On CUDA the figure is ``torch.cuda.max_memory_allocated``; on CPU the process's
peak resident set (``ru_maxrss``). Prints each peak and billa's saving.

    python benchmarks/loss_memory.py                                   # CPU default: micro batch 8 x 512
    python benchmarks/loss_memory.py --batch 8 --seq 1024 --device cuda   # the issue's size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCH = {  # hidden 512 with BiLLa's vocabulary: the loss dominates a step's activations
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
VOCAB = 46_943


def bare_module(loss_chunk_tokens: int, model: dict | None = None, vocab_size: int = VOCAB, **hparams):
    """billa's LightningModule around ``model`` (default: ``ARCH``, random init) at ``vocab_size`` rows; no optimizer
    or schedule: a benchmark steps it. ``hparams``: more ``BillaLM`` arguments (``gradient_checkpointing``)."""
    from billa.model.module import BillaLM

    return BillaLM(
        model=model or {"architecture": ARCH, "pretrained_path": None},
        vocab_size=vocab_size,
        optimizer={},
        scheduler={},
        total_steps=1,
        loss_chunk_tokens=loss_chunk_tokens,
        **hparams,
    )


def _step(contender: str, batch: int, seq: int, device: str, chunk: int) -> dict:
    import torch

    from billa.model.builders import llama_config

    torch.manual_seed(0)
    module = bare_module(chunk if contender == "billa" else 0)
    from transformers import LlamaForCausalLM

    module.model = LlamaForCausalLM(llama_config(ARCH, VOCAB)).to(device)
    module.to(device)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        loss = module.model(**data).loss if contender == "hf" else module.model_step(data)
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"contender": contender, "loss": float(loss), "peak_bytes": peak, "before_bytes": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunk", type=int, default=2048, help="billa's loss_chunk_tokens")
    parser.add_argument("--contender", choices=["hf", "billa", "billa-unchunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:  # child process: one step, one JSON line
        contender = "billa" if args.contender == "billa" else args.contender
        result = _step(contender, args.batch, args.seq, args.device, args.chunk if args.contender == "billa" else 0)
        print(json.dumps({**result, "contender": args.contender}))
        return
    print(
        f"one training step, LLaMA {ARCH['num_hidden_layers']}x{ARCH['hidden_size']}, vocab {VOCAB:,}, micro batch "
        f"{args.batch} x {args.seq}, device {args.device}, billa loss_chunk_tokens {args.chunk}"
    )
    results = {}
    for contender in ("hf", "billa-unchunked", "billa"):
        command = [sys.executable, __file__, "--contender", contender]
        command += [
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--device",
            args.device,
            "--chunk",
            str(args.chunk),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[contender] = json.loads(out)
        r = results[contender]
        print(
            f"  {contender:16s} peak {r['peak_bytes'] / 2**30:6.2f} GiB (step adds "
            f"{(r['peak_bytes'] - r['before_bytes']) / 2**30:5.2f} GiB)  loss {r['loss']:.4f}"
        )
    hf, billa = results["hf"]["peak_bytes"], results["billa"]["peak_bytes"]
    print(f"billa peak / HF Trainer step peak = {billa / hf:.3f} ({(1 - billa / hf) * 100:.1f}% lower; goal >= 30%)")


if __name__ == "__main__":
    main()
