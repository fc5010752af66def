"""Time billa's training step against a plain PyTorch loop and transformers.Trainer, in one run.

Same model (a LLaMA of the tiny family, scaled so a step is long enough to time), same batches, same optimizer
(AdamW, cosine schedule, grad clip 2.0), same precision. Each contender runs ``--steps`` optimizer steps; the first
``--warmup`` are not timed. Contenders alternate over ``--repeats`` rounds and the median steps/s is compared, so
machine noise hits all three alike. Prints ratios (billa / baseline; > 1 means billa is faster).

    python benchmarks/train_step.py [--steps 30] [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from harness import HFClock, LightningClock, fit_lightning, hf_arguments  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import LlamaForCausalLM, Trainer  # noqa: E402

from billa.data.collate import PadCollator  # noqa: E402
from billa.model.builders import llama_config  # noqa: E402
from billa.model.module import BillaLM  # noqa: E402
from billa.model.schedule import cosine_with_warmup  # noqa: E402

ARCH = {  # the tiny family, wider so a CPU step takes ~0.1-0.3 s
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
VOCAB, LR = 3000, 1e-3
# (batch, sequence length) per precision: CPUs without native bf16 run autocast-bf16 ~20x slower than fp32
SHAPES = {"fp32": (8, 256), "bf16": (4, 64)}
SCHEDULER = {"_target_": "billa.model.schedule.cosine_with_warmup", "_partial_": True, "warmup_steps": 5}


def billa_optimizer(bf16: bool) -> dict:
    """The optimizer node billa's train.py builds for this precision (fused AdamW, kept under bf16-mixed)."""
    from hydra import compose, initialize_config_dir

    from billa.config import plan_hardware

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"hardware.precision={'bf16-mixed' if bf16 else '32-true'}", f"optimizer.lr={LR}"]
        )
    return plan_hardware(cfg).optimizer


def make_items(n: int, seq: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def fresh_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(ARCH, VOCAB))


def param_groups(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    return [{"params": decay}, {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def run_plain(items, steps, warmup, bf16, batch) -> float:
    model = fresh_model().train()
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = cosine_with_warmup(optimizer, total_steps=steps, warmup_steps=5)
    loader = DataLoader(items, batch_size=batch, collate_fn=PadCollator(0))
    start = None
    for step, batch in enumerate(loader):
        if step == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return (steps - warmup) / (time.perf_counter() - start)


def run_billa(items, steps, warmup, bf16, batch) -> float:
    module = BillaLM(
        model={"architecture": ARCH, "pretrained_path": None},
        vocab_size=VOCAB,
        optimizer=billa_optimizer(bf16),
        scheduler=SCHEDULER,
        total_steps=steps,
        validate_at_start=False,
        clip_grad_norm=2.0 if bf16 else None,  # as billa.train.run: bf16-mixed keeps fused AdamW and clips itself
    )
    module.model = fresh_model()
    clock = LightningClock(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        loader = DataLoader(items, batch_size=batch, collate_fn=PadCollator(0))
        precision = "bf16-mixed" if bf16 else "32-true"
        fit_lightning(
            module, loader, clock, tmp, accelerator="cpu", precision=precision, steps=steps, clip=None if bf16 else 2.0
        )
    return (steps - warmup) / (clock.end - clock.start)


def run_hf(items, steps, warmup, bf16, batch) -> float:
    clock = HFClock(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        args = hf_arguments(tmp, steps=steps, batch=batch, lr=LR, clip=2.0, warmup_steps=5, cpu=True, bf16=bf16)
        trainer = Trainer(
            model=fresh_model(), args=args, train_dataset=items, data_collator=PadCollator(0), callbacks=[clock]
        )
        trainer.train()
    return (steps - warmup) / (clock.end - clock.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    print(
        f"model: LLaMA {ARCH['num_hidden_layers']}x{ARCH['hidden_size']}, vocab {VOCAB}, {args.steps} steps "
        f"({args.warmup} untimed), {args.repeats} rounds, torch threads {torch.get_num_threads()}"
    )
    for precision in args.precision:
        bf16 = precision == "bf16"
        batch, seq = SHAPES[precision]
        items = make_items(args.steps * batch, seq)
        rates = {"plain": [], "billa": [], "hf": []}
        for _ in range(args.repeats):
            for name, fn in (("plain", run_plain), ("billa", run_billa), ("hf", run_hf)):
                rates[name].append(fn(items, args.steps, args.warmup, bf16, batch))
        med = {name: statistics.median(values) for name, values in rates.items()}
        print(
            f"[{precision}] batch {batch}x{seq} tokens; steps/s (median): plain {med['plain']:.3f}  "
            f"billa {med['billa']:.3f}  transformers.Trainer {med['hf']:.3f}"
        )
        print(
            f"[{precision}] billa / plain loop = {med['billa'] / med['plain']:.3f}x (goal >= 0.98)   "
            f"billa / HF Trainer = {med['billa'] / med['hf']:.3f}x (goal >= 1.05)"
        )


if __name__ == "__main__":
    main()
