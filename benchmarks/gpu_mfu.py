"""Tokens/s and MFU of billa's training step on one CUDA GPU: a LLaMA-7B-shaped layer stack under bf16.

Layers of LLaMA-7B's shape (hidden 4,096, 32 heads, MLP 11,008) with BiLLa's 46,943-piece vocabulary, as many as
``--layers`` (16 fill an 80 GB GPU with bf16 weights, gradients and AdamW states: 3.4 B parameters x 8 bytes =
27 GB, plus activations). The step is billa's: ``BillaLM.model_step`` (lm_head + loss over label positions in
chunks), backward, clipping, fused AdamW, all in bf16 (as DeepSpeed's bf16 mode computes) with SDPA attention on full
rows (an all-ones attention mask, as billa's collator gives full rows: transformers then calls SDPA with
``is_causal`` and no mask, which the script checks by running a step with only the flash kernel allowed).

Contenders ``COMPILE:CHECKPOINTING:MICRO_BATCH`` (``eager:off:4`` ... ``compiled:on:8``) share one model and one
optimizer and alternate over ``--rounds``: ``compiled`` is billa's ``compile=true`` (``compile_decoder_layers``:
``torch.compile`` per decoder layer), ``eager`` runs the same model under ``torch.compiler.set_stance("force_eager")``;
checkpointing is HF's non-reentrant activation checkpointing. Shapes are static here (full rows of ``--seq``), so
each micro batch gets its own graph. A contender that runs out of memory is reported and dropped.
MFU = 6 N + 12 L h s FLOPs per token (``billa.callbacks.flops_per_token``; N without the input embedding,
recomputation not counted) x tokens/s / the GPU's dense bf16 peak.

    python benchmarks/gpu_mfu.py [--layers 16] [--seq 2048] [--rounds 2] [--contenders eager:off:4 compiled:off:4 ...]
        [--profile compiled:off:8]                     # + where one contender's GPU time goes, by kernel kind
    python benchmarks/gpu_mfu.py --device cpu --hidden 128 --heads 2 --layers 2 --seq 64   # smoke test of the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5: gradient_checkpointing_* renamed

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from billa.callbacks import flops_per_token  # noqa: E402
from billa.model.builders import compile_decoder_layers, llama_config  # noqa: E402
from billa.model.module import BillaLM  # noqa: E402

VOCAB = 46_943
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}
CONTENDERS = ["eager:off:4", "compiled:off:4", "compiled:off:8", "compiled:off:12", "eager:on:8", "compiled:on:8"]
KERNELS = {  # kernel-name fragment -> where a step's GPU time goes (first match wins)
    "flash": "attention (SDPA flash)",
    "fmha": "attention (SDPA flash)",
    "triton": "fused elementwise (inductor)",
    "gemm": "matmuls (cuBLAS)",
    "nvjet": "matmuls (cuBLAS)",
    "xmma": "matmuls (cuBLAS)",
    "cutlass": "matmuls (cuBLAS)",
    "adam": "optimizer (fused AdamW)",
    "multi_tensor": "clipping (foreach)",
    "embedding": "embedding",
}


def peak_tflops(name: str) -> float | None:
    """Dense bf16 tensor-core peak of a GPU by its marketing name (None where unknown: pass --peak-tflops)."""
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def build(args) -> tuple[BillaLM, torch.optim.Optimizer, int]:
    """billa's module around a randomly initialised bf16 stack on the device, compiled per layer, and fused AdamW."""
    arch = {
        "hidden_size": args.hidden,
        "intermediate_size": -(-args.hidden * 8 // 3 // 256) * 256,  # LLaMA: 8/3 h rounded up to 256 (4,096 -> 11,008)
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": args.seq,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    module = BillaLM(
        model={"architecture": arch, "pretrained_path": None},
        vocab_size=VOCAB,
        optimizer={},
        scheduler={},
        total_steps=1,
    )
    with torch.device(args.device):
        config = llama_config(arch, VOCAB)
        config._attn_implementation = "sdpa"
        module.model = LlamaForCausalLM(config).to(torch.bfloat16)
    module.model.train()
    module.model.config.use_cache = False
    compile_decoder_layers(module.model)  # lazy: compiles at the first step of a compiled contender
    n_params = sum(p.numel() for p in module.model.parameters()) - module.model.model.embed_tokens.weight.numel()
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    return module, optimizer, n_params


def batch_of(rows: int, seq: int, device: str) -> dict:
    ids = torch.randint(3, VOCAB, (rows, seq), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def check_flash(module: BillaLM, seq: int, device: str) -> str:
    """Run one forward pass with only SDPA's flash kernel allowed: it fails where a mask reaches SDPA."""
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.compiler.set_stance("force_eager"):
            module.model_step(batch_of(1, seq, device))
        return "SDPA flash kernel (a step with only FLASH_ATTENTION allowed ran)"
    except RuntimeError as err:
        return f"NOT the flash kernel: {str(err).splitlines()[0]}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_round(module, optimizer, contender: str, args, warmup: int) -> dict:
    """``warmup`` untimed steps, then ``--steps`` timed ones; tokens/s, peak memory and the last loss."""
    mode, checkpointing, rows = contender.split(":")
    rows = int(rows)
    if checkpointing == "on":
        module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        module.model.gradient_checkpointing_disable()
    data = batch_of(rows, args.seq, args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stance = "default" if mode == "compiled" else "force_eager"
    with torch.compiler.set_stance(stance):
        for step in range(warmup + args.steps):
            if step == warmup:
                sync(args.device)
                start = time.perf_counter()
            loss = module.model_step(data)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.model.parameters(), 2.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    sync(args.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    return {"tokens_per_s": args.steps * rows * args.seq / seconds, "peak_gib": peak, "loss": loss.item()}


def profile_steps(module, optimizer, contender: str, args, steps: int = 2) -> None:
    """Where the GPU time of ``steps`` steps of ``contender`` goes: kernel time per kind, and GPU-idle time."""
    from torch.profiler import ProfilerActivity, profile

    run_round(module, optimizer, contender, argparse.Namespace(**{**vars(args), "steps": 1}), warmup=1)
    cuda = args.device == "cuda"  # on a CPU (smoke test) operator times stand in for kernel times
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        r = run_round(module, optimizer, contender, argparse.Namespace(**{**vars(args), "steps": steps}), warmup=0)
    step_ms = args.seq * int(contender.split(":")[2]) / r["tokens_per_s"] * 1e3
    kinds: dict[str, float] = {}
    events = prof.key_averages()
    ms = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps for e in events}
    counts = {e.key: e.count // steps for e in events}
    names = sorted(ms, key=lambda k: -ms[k])
    for name in names:
        kind = next((k for f, k in KERNELS.items() if f in name.lower()), "other kernels")
        kinds[kind] = kinds.get(kind, 0.0) + ms[name]
    print(f"profile of {contender}: {step_ms:.0f} ms per step (wall, profiled); GPU kernel time per step:")
    for kind, total in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:30s} {total:7.1f} ms  {total / step_ms:6.1%}")
    print(f"  {'GPU idle or overlapping':30s} {step_ms - sum(kinds.values()):7.1f} ms")
    print("  top kernels:")
    for name in names[:12]:
        print(f"    {ms[name]:7.1f} ms  x{counts[name]:<4d} {name[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--contenders", nargs="+", default=CONTENDERS, help="COMPILE:CHECKPOINTING:MICRO_BATCH")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps in the first round (1 later)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--profile", metavar="CONTENDER", help="then profile two steps of this contender")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_mfu.py needs a CUDA GPU (--device cpu only smoke-tests the script)")
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per micro batch, not a dynamic one
    torch._dynamo.config.recompile_limit = 32  # graphs: micro batches x checkpointing x grad mode (torch >= 2.7)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    peak = args.peak_tflops or peak_tflops(name)
    module, optimizer, n_params = build(args)
    fpt = flops_per_token(n_params, args.layers, args.hidden, args.seq)
    print(
        f"{name}, torch {torch.__version__}, peak {peak} TFLOP/s dense bf16; {args.layers} layers of hidden "
        f"{args.hidden}, {n_params / 1e9:.2f} B params, seq {args.seq}, vocab {VOCAB:,}; {fpt / 1e9:.2f} GFLOP/token",
        flush=True,
    )
    print(f"attention: {check_flash(module, args.seq, args.device)}", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in args.contenders}
    for round_ in range(args.rounds):
        for contender in [c for c in args.contenders if results[c] is not None]:
            start = time.perf_counter()
            try:
                r = run_round(module, optimizer, contender, args, args.warmup if round_ == 0 else 1)
            except torch.OutOfMemoryError:
                r = None  # the step's tensors are freed with the exception, below
            if r is None:
                print(f"round {round_ + 1} {contender:15s}: out of memory, dropped", flush=True)
                results[contender] = None
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            results[contender].append(r)
            print(
                f"round {round_ + 1} {contender:15s}: {r['tokens_per_s']:9,.0f} tokens/s, peak {r['peak_gib']:.1f} "
                f"GiB, loss {r['loss']:.3f} ({time.perf_counter() - start:.0f} s with warmup/compile)",
                flush=True,
            )
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"median over {args.rounds} rounds:")
    for contender, runs in results.items():
        if not runs:
            continue
        mode, checkpointing, rows = contender.split(":")
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in runs)
        tflops = fpt * tokens_per_s / 1e12
        mfu = f"MFU {tflops / peak:.1%}" if peak else "MFU n/a (pass --peak-tflops)"
        print(
            f"  {mode:8s} activation checkpointing {checkpointing:3s} micro batch {rows} x {args.seq}: "
            f"{tokens_per_s:,.0f} tokens/s, {tflops:.0f} TFLOP/s, {mfu}, peak memory "
            f"{max(r['peak_gib'] for r in runs):.1f} GiB",
            flush=True,
        )
    if args.profile:
        profile_steps(module, optimizer, args.profile, args)


if __name__ == "__main__":
    main()
