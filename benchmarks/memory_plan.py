"""The memory plan's activations against what a real step holds, for LLaMA-7B's proportions at a size that runs here.

Each row builds billa's module (transformers' LLaMA layers with 7B's ratios: SwiGLU width 2.6875 h, head dim 128),
runs one ``token_nll`` forward + backward under ``MemTracker`` (``billa.distributed.memory.measure_activations``) and
prints the plan's figure beside the measured one. Rows: the recipe's ZeRO-3 bf16 settings (16-bit weights, chunks of
2,048 label tokens, residual dropout 0.05) without and with activation checkpointing, autocast over fp32 weights, and
fp32; ``--device cuda`` measures on a GPU, where the figure also shows what CUDA's kernels allocate.

    python benchmarks/memory_plan.py                      # CPU: hidden 1,024, 2 layers, vocab 46,943, 4,096 tokens
    python benchmarks/memory_plan.py --device cuda --hidden 4096 --layers 2 --tokens 8192
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loss_memory import bare_module  # noqa: E402 - billa's module as the other memory benchmarks build it (this folder)


def _module(arch: dict, vocab: int, checkpointing: bool, chunk: int, dropout: float, device: str):
    import torch

    torch.manual_seed(0)
    model = {"architecture": arch, "pretrained_path": None, "residual_dropout": dropout, "kernels": "torch"}
    module = bare_module(chunk, model, vocab, gradient_checkpointing=checkpointing)
    module.configure_model()
    return module.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=46_943)
    parser.add_argument("--tokens", type=int, default=4096, help="micro batch x sequence (rows of 1,024)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from billa.distributed.memory import activation_bytes, measure_activations

    h = args.hidden
    arch = {
        "hidden_size": h,
        "intermediate_size": h * 11008 // 4096,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, h // 128),
        "num_key_value_heads": max(1, h // 128),
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }
    rows = [  # (name, weight mode, checkpointing, loss chunk, residual dropout)
        ("ZeRO-3 bf16 (recipe)", "16-bit", False, 2048, 0.05),
        ("ZeRO-3 bf16, checkpointing", "16-bit", True, 2048, 0.05),
        ("bf16-mixed, fp32 weights", "mixed", False, 2048, 0.0),
        ("fp32", "fp32", False, 2048, 0.0),
    ]
    print(f"LLaMA {args.layers} x {h} (SwiGLU {arch['intermediate_size']}), vocab {args.vocab:,}, {args.tokens:,} "
          f"tokens, {args.device}")  # fmt: skip
    for name, mode, checkpointing, chunk, dropout in rows:
        module = _module(arch, args.vocab, checkpointing, chunk, dropout, args.device)
        ids = torch.randint(0, args.vocab, (args.tokens // 1024, 1024), device=args.device)
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        measured = measure_activations(module, batch, mode)
        planned = activation_bytes(arch, args.vocab, args.tokens, mode, checkpointing, chunk, dropout)
        print(f"  {name:28s} plan {planned / 2**20:9.1f} MiB   measured {measured / 2**20:9.1f} MiB   "
              f"{planned / measured - 1:+6.1%}")  # fmt: skip
        del module


if __name__ == "__main__":
    main()
