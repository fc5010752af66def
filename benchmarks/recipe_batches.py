"""Throughput on recipe-shaped batches: HF Trainer, a plain loop, billa ``layout=pad`` and billa ``layout=pack``.

The recipe's batches are not full rows of labels. Stage 3 (SFT) dialogues mask the prompt and have answers of very
different lengths; stage 1's conditional generation masks the part before the cut. Samples here are drawn so:

- ``sft``: prompt length ~ lognormal (median 60 tokens), answer ~ lognormal (median 180), row capped at ``--max-len``;
  labels only on the answer.
- ``cond``: document length ~ uniform(64, max_len), cut ~ uniform(10 %, 90 %) of it; labels only after the cut.

Same model, same init, same samples in the same order for every contender (``--batch`` samples per optimizer step,
AdamW, clip 2.0). HF Trainer gets dynamic padding to the longest sample of the batch (what its
``DataCollatorForSeq2Seq``/``DataCollatorWithPadding`` do); the plain loop the same batches; billa ``pad`` the same
through ``BillaLM``; billa ``pack`` packs each step's samples into rows of ``--max-len`` (``PackCollator``; on a GPU
with SDPA the rows go by position ids, no T x T mask). ``--compile`` adds billa ``pack`` with ``compile=true`` (each
decoder layer compiled) and HF Trainer with its ``torch_compile=True``. Contenders alternate over ``--repeats``
rounds; the figure is labelled tokens per second (median), and the mean training loss of each contender is printed
to show they train on the same objective. The tokens each layout feeds the model per step are printed too: where
the step time follows them (a compute-bound step) packing gains what padding wastes; a small model on a large GPU
is bound by kernel launches and per-step overhead instead, and no layout can show there.

    python benchmarks/recipe_batches.py                        # CPU default: small model, max_len 512
    python benchmarks/recipe_batches.py --accelerator gpu --precision bf16 --hidden 2048 --layers 8 --batch 16 \
        --max-len 1024 --kind sft                              # compute-bound on an H100
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from harness import HFClock, LightningClock, fit_lightning, hf_arguments  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import LlamaForCausalLM, Trainer  # noqa: E402

from billa.data.collate import PackCollator, PadCollator  # noqa: E402
from billa.data.packing import MASK, packed_layout  # noqa: E402
from billa.model.builders import compile_decoder_layers, llama_config  # noqa: E402
from billa.model.module import BillaLM  # noqa: E402
from billa.model.schedule import cosine_with_warmup  # noqa: E402

VOCAB, LR, CLIP = 46_943, 3e-4, 2.0


def make_samples(kind: str, n: int, max_len: int, seed: int = 0) -> list[dict]:
    """``n`` samples of the given shape, token ids random, labels -100 where the recipe masks."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        if kind == "sft":
            prompt = int(torch.empty(1).log_normal_(4.1, 0.8, generator=g).clamp(8, max_len // 2))  # median e^4.1 ~ 60
            answer = int(torch.empty(1).log_normal_(5.2, 0.9, generator=g).clamp(4, max_len - prompt))  # median ~180
            length, cut = prompt + answer, prompt
        else:
            length = int(torch.randint(64, max_len + 1, (1,), generator=g))
            cut = int(length * (0.1 + 0.8 * torch.rand(1, generator=g)))
        ids = [1, *torch.randint(3, VOCAB, (length - 1,), generator=g).tolist()]
        samples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return samples


def fed_tokens(samples: list[dict], batch: int, collate) -> int:
    """Token positions (padding included) the model runs on when ``collate`` batches ``samples`` by ``batch``."""
    return sum(collate(samples[i : i + batch])["input_ids"].numel() for i in range(0, len(samples), batch))


def label_tokens(samples: list[dict]) -> int:
    """Tokens the loss is taken on (the first position of a sample predicts nothing)."""
    return sum(sum(1 for y in s["labels"][1:] if y != -100) for s in samples)


class Setup:
    def __init__(self, args):
        self.args = args
        self.arch = {
            "hidden_size": args.hidden,
            "intermediate_size": args.hidden * 8 // 3 // 64 * 64 + 64,
            "num_hidden_layers": args.layers,
            "num_attention_heads": max(args.hidden // 64, 1),
            "num_key_value_heads": max(args.hidden // 64, 1),
            "max_position_embeddings": args.max_len,
            "tie_word_embeddings": False,
        }
        self.gpu = args.accelerator == "gpu"
        self.bf16 = args.precision == "bf16"
        torch.manual_seed(0)
        self._template = LlamaForCausalLM(llama_config(self.arch, VOCAB))  # initialised once (seconds at 0.6 B)

    def model(self) -> LlamaForCausalLM:
        """A fresh copy of the same initial weights, for each contender and round."""
        return copy.deepcopy(self._template)


def run_plain(setup: Setup, samples, steps, warmup) -> tuple[float, float]:
    device = "cuda" if setup.gpu else "cpu"
    model = setup.model().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    scheduler = cosine_with_warmup(optimizer, total_steps=steps, warmup_steps=2)
    losses, start = [], None
    for step, batch in enumerate(DataLoader(samples, batch_size=setup.args.batch, collate_fn=PadCollator(0))):
        if step == warmup:
            torch.cuda.synchronize() if setup.gpu else None
            start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=setup.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    torch.cuda.synchronize() if setup.gpu else None
    return time.perf_counter() - start, float(torch.stack(losses).float().mean())


def run_billa(setup: Setup, samples, steps, warmup, layout: str, compile: bool = False) -> tuple[float, float]:
    precision = "bf16-mixed" if setup.bf16 else "32-true"
    optimizer = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": LR, "betas": [0.9, 0.95]}
    optimizer.update(weight_decay=0.1, fused=True)  # as conf/train.yaml; bf16-mixed keeps fused (BillaLM clips)
    module = BillaLM(
        model={"architecture": setup.arch, "pretrained_path": None},
        vocab_size=VOCAB,
        optimizer=optimizer,
        scheduler={"_target_": "billa.model.schedule.cosine_with_warmup", "_partial_": True, "warmup_steps": 2},
        total_steps=steps,
        validate_at_start=False,
        clip_grad_norm=CLIP if setup.bf16 else None,
        compile=compile,
    )
    module.model = setup.model()  # set here, so configure_model builds nothing: do what it does with compile=true
    if compile:
        compile_decoder_layers(module.model)
    device = "cuda" if setup.gpu else "cpu"  # as BillaDataModule: no 4D mask where SDPA reads the position ids
    pack_mask = packed_layout(device, module.model.config._attn_implementation) == MASK
    collate = PackCollator(0, setup.args.max_len, mask=pack_mask) if layout == "pack" else PadCollator(0)
    clock = LightningClock(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        loader = DataLoader(samples, batch_size=setup.args.batch, collate_fn=collate)
        clip = None if setup.bf16 else CLIP
        fit_lightning(
            module, loader, clock, tmp, accelerator=setup.args.accelerator, precision=precision, steps=steps, clip=clip
        )
    return clock.end - clock.start, float(torch.stack(clock.losses).float().mean())


def run_hf(setup: Setup, samples, steps, warmup, compile: bool = False) -> tuple[float, float]:
    clock = HFClock(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        args = hf_arguments(
            tmp,
            steps=steps,
            batch=setup.args.batch,
            lr=LR,
            clip=CLIP,
            warmup_steps=2,
            cpu=not setup.gpu,
            bf16=setup.bf16,
            torch_compile=compile,
        )
        trainer = Trainer(
            model=setup.model(), args=args, train_dataset=samples, data_collator=PadCollator(0), callbacks=[clock]
        )
        trainer.train_dataset = samples
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(samples)  # same order
        out = trainer.train()
    return clock.end - clock.start, float(out.training_loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", nargs="+", default=["sft", "cond"], choices=["sft", "cond"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="samples per optimizer step")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="add billa-pack compile=true and HF torch_compile")
    args = parser.parse_args()
    setup = Setup(args)
    contenders = {
        "hf": lambda s: run_hf(setup, s, args.steps, args.warmup),
        "plain": lambda s: run_plain(setup, s, args.steps, args.warmup),
        "billa-pad": lambda s: run_billa(setup, s, args.steps, args.warmup, "pad"),
        "billa-pack": lambda s: run_billa(setup, s, args.steps, args.warmup, "pack"),
    }
    if args.compile:
        contenders["hf-compiled"] = lambda s: run_hf(setup, s, args.steps, args.warmup, compile=True)
        contenders["billa-pack-compiled"] = lambda s: run_billa(setup, s, args.steps, args.warmup, "pack", True)
    print(
        f"LLaMA {args.layers}x{args.hidden}, vocab {VOCAB:,}, {args.batch} samples/step, max_len {args.max_len}, "
        f"{args.steps} steps ({args.warmup} untimed), {args.repeats} rounds, {args.accelerator} {args.precision}, "
        f"torch threads {torch.get_num_threads()}"
    )
    for kind in args.kind:
        samples = make_samples(kind, args.steps * args.batch, args.max_len)
        timed = samples[args.warmup * args.batch :]
        labelled = label_tokens(timed)
        share = labelled / sum(len(s["input_ids"]) for s in timed)
        rates, losses = {name: [] for name in contenders}, {}
        for round_ in range(args.repeats):
            for name, fn in contenders.items():
                seconds, loss = fn(samples)
                rates[name].append(labelled / seconds)
                losses[name] = loss
                print(f"[{kind}] round {round_ + 1} {name}: {labelled / seconds:,.0f} labelled tokens/s", flush=True)
        med = {name: statistics.median(values) for name, values in rates.items()}
        print(
            f"[{kind}] {labelled:,} labelled tokens timed ({share:.0%} of tokens labelled); "
            f"tokens fed to the model: padded {fed_tokens(timed, args.batch, PadCollator(0)):,}, "
            f"packed {fed_tokens(timed, args.batch, PackCollator(0, args.max_len, mask=False)):,}"
        )
        for name in contenders:
            print(f"[{kind}]   {name:20s} {med[name]:10.1f} labelled tokens/s   mean train loss {losses[name]:.4f}")
        print(
            f"[{kind}] billa-pack / HF Trainer = {med['billa-pack'] / med['hf']:.2f}x (goal >= 1.5)   "
            f"billa-pad / HF Trainer = {med['billa-pad'] / med['hf']:.2f}x (goal >= 1.0)   "
            f"billa-pad / plain = {med['billa-pad'] / med['plain']:.2f}x"
        )
        if args.compile:
            print(
                f"[{kind}] compiled: billa-pack / HF Trainer = {med['billa-pack-compiled'] / med['hf-compiled']:.2f}x,"
                f" billa-pack compiled / HF Trainer eager = {med['billa-pack-compiled'] / med['hf']:.2f}x"
            )


if __name__ == "__main__":
    main()
