"""Tokens/s and MFU of billa's training step on one CUDA GPU: a LLaMA-7B-shaped layer stack under bf16.

Layers of LLaMA-7B's shape (hidden 4,096, 32 heads, MLP 11,008) with BiLLa's 46,943-piece vocabulary, as many as
``--layers`` (16 fill an 80 GB GPU with bf16 weights, gradients and AdamW states: 3.6 B parameters x 8 bytes =
29 GB, plus activations). The step is billa's: ``BillaLM.model_step`` (lm_head + loss over label positions in
chunks), backward, fused AdamW, all in bf16 (as DeepSpeed's bf16 mode computes) with SDPA attention. Runs without and
with activation checkpointing. MFU = 6 N + 12 L h s FLOPs per token (``billa.callbacks.flops_per_token``; N without the
input embedding, recomputation not counted) x tokens/s / the GPU's dense bf16 peak.

    python benchmarks/gpu_mfu.py [--layers 16] [--seq 2048] [--batch 4] [--ckpt-batch 8] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from billa.callbacks import flops_per_token  # noqa: E402
from billa.model.builders import llama_config  # noqa: E402
from billa.model.module import BillaLM  # noqa: E402

VOCAB = 46_943
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_tflops(name: str) -> float | None:
    """Dense bf16 tensor-core peak of a GPU by its marketing name (None where unknown: pass --peak-tflops)."""
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def measure(layers: int, seq: int, batch: int, steps: int, warmup: int, checkpointing: bool) -> dict:
    arch = {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": seq,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    module = BillaLM(
        model={"architecture": arch, "pretrained_path": None},
        vocab_size=VOCAB,
        optimizer={},
        scheduler={},
        total_steps=steps,
        gradient_checkpointing=checkpointing,
    )
    with torch.device("cuda"):
        config = llama_config(arch, VOCAB)
        config._attn_implementation = "sdpa"
        module.model = LlamaForCausalLM(config).to(torch.bfloat16)
    module.model.train()
    if checkpointing:
        module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in module.model.parameters()) - module.model.model.embed_tokens.weight.numel()
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(3, VOCAB, (batch, seq), device="cuda")
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = module.model_step(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 2.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = (steps - warmup) * batch * seq / seconds
    result = {
        "layers": layers,
        "params": n_params,
        "tokens_per_s": tokens_per_s,
        "tflops": flops_per_token(n_params, layers, 4096, seq) * tokens_per_s / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss),
    }
    del module, optimizer, data
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="micro batch without activation checkpointing")
    parser.add_argument("--ckpt-batch", type=int, default=8, help="micro batch with activation checkpointing")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_mfu.py needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    print(f"{name}, torch {torch.__version__}, peak {peak} TFLOP/s dense bf16, seq {args.seq}, vocab {VOCAB:,}")
    for mode in args.checkpointing:
        on = mode == "on"
        batch = args.ckpt_batch if on else args.batch
        r = measure(args.layers, args.seq, batch, args.steps, args.warmup, on)
        mfu = f"MFU {r['tflops'] / peak:.1%}" if peak else "MFU n/a (pass --peak-tflops)"
        print(
            f"activation checkpointing {mode:3s}: {r['layers']} layers, {r['params'] / 1e9:.2f} B params, micro batch "
            f"{batch} x {args.seq}: {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.0f} TFLOP/s, {mfu}, "
            f"peak memory {r['peak_mem_gib']:.1f} GiB, loss {r['loss']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
