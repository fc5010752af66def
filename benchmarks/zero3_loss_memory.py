"""Peak memory of one ZeRO-3 training step: billa's chunked loss (``HeadNLL``) against the one-piece loss.

Two ranks over gloo on CPU (or NCCL on 2 GPUs), the real DeepSpeed ZeRO-3 engine, ``BillaLM`` built inside
``deepspeed.zero.Init`` as under Lightning, BiLLa's 46,943-piece vocabulary, fully labelled rows. Contenders, each in
fresh processes (a fresh allocator): ``one-piece`` (``loss_chunk_tokens=0``: lm_head called as a module on all N label
rows, the (N, V) logits whole; what billa ran under ZeRO-3 before ``HeadNLL``) and ``chunked`` (``loss_chunk_tokens``,
default 2,048). A step = forward, backward and an AdamW step. The figure is each rank's peak: on CUDA
``torch.cuda.max_memory_allocated``, on CPU the process's peak resident set (``ru_maxrss``); the larger rank's is
reported, with what the step added to the peak before it.

    python benchmarks/zero3_loss_memory.py                       # CPU, 2 ranks, micro batch 8 x 512 per rank
    python benchmarks/zero3_loss_memory.py --device cuda --batch 8 --seq 1024   # 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loss_memory import ARCH, VOCAB, bare_module  # noqa: E402 - the same model as the one-process benchmark (this folder)

WORLD = 2


def _peak(cuda: bool) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rank(args: argparse.Namespace) -> dict:
    """One rank of the job: build under zero.Init, one step; returns this rank's peak bytes."""
    import torch

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(args.rank)
    import deepspeed

    import billa.model.module  # noqa: F401 - imported before zero.Init: lightning's import of torch._dynamo fails inside it

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cuda},
    }
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        module = bare_module(args.chunk)
        module.configure_model()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)  # hooks HeadNLL too
    device = torch.device("cuda", args.rank) if cuda else torch.device("cpu")
    g = torch.Generator().manual_seed(args.rank)
    ids = torch.randint(3, VOCAB, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _peak(cuda)
    loss = module.model_step(batch)
    engine.backward(loss)
    engine.step()
    if cuda:
        torch.cuda.synchronize()
    return {"rank": args.rank, "loss": float(loss), "peak_bytes": _peak(cuda), "before_bytes": before}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _job(args: argparse.Namespace, chunk: int) -> list[dict]:
    """Both ranks of one contender, each a fresh process; their JSON results."""
    port = str(_free_port())
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank)}
        env.update(LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), PYTHONWARNINGS="ignore")
        command = [sys.executable, __file__, "--rank", str(rank), "--chunk", str(chunk)]
        command += ["--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode:
            raise SystemExit(f"rank failed (exit {proc.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="micro batch per rank")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunk", type=int, default=2048, help="loss_chunk_tokens of the chunked contender")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # child process: one rank, one JSON line
    args = parser.parse_args()
    if args.rank is not None:
        print(json.dumps(_rank(args)))
        return
    tokens = args.batch * args.seq
    print(
        f"one ZeRO-3 step, {WORLD} ranks ({args.device}), LLaMA {ARCH['num_hidden_layers']}x{ARCH['hidden_size']}, "
        f"vocab {VOCAB:,}, micro batch {args.batch} x {args.seq} = {tokens:,} label tokens per rank"
    )
    peaks = {}
    for name, chunk in (("one-piece", 0), ("chunked", args.chunk)):
        ranks = _job(args, chunk)
        top = max(ranks, key=lambda r: r["peak_bytes"])
        losses = ", ".join(f"{r['loss']:.4f}" for r in ranks)
        peaks[name] = top["peak_bytes"]
        print(
            f"  {name:9s} loss_chunk_tokens {chunk:5d}: peak {top['peak_bytes'] / 2**30:6.2f} GiB (rank {top['rank']}; "
            f"the step adds {(top['peak_bytes'] - top['before_bytes']) / 2**30:5.2f} GiB)  "
            f"losses {losses}"
        )
    ratio = peaks["chunked"] / peaks["one-piece"]
    print(f"chunked peak / one-piece peak = {ratio:.3f} ({(1 - ratio) * 100:.1f}% lower)")


if __name__ == "__main__":
    main()
