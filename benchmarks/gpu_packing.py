"""Packed rows on a CUDA GPU: same losses without the T x T mask, a bf16-mixed Lightning fit, and the time saved.

1. Losses: samples one per padded row, packed with the 4D mask, and packed as transformers' flattening convention
   chooses it on this device (``billa.data.packing``: position ids for SDPA, one flattened row for flash-attention),
   in fp32 on the GPU; flash-attention 2 too where the ``flash_attn`` package is installed.
2. A 3-step ``Trainer.fit`` of ``BillaLM`` under bf16-mixed with fused AdamW and billa's clipping, on packed batches:
   the batch that reaches ``training_step`` must carry no 4D mask.
3. Forward + backward time of one packed micro batch (``--batch`` x ``--seq``), 4D mask against position ids.

    python benchmarks/gpu_packing.py [--batch 8] [--seq 1024] [--hidden 1024] [--layers 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from harness import quiet_trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from billa.data.collate import PackCollator, PadCollator  # noqa: E402
from billa.data.packing import feed_packed, packed_layout  # noqa: E402
from billa.model.builders import llama_config  # noqa: E402
from billa.model.module import BillaLM  # noqa: E402

VOCAB = 46_943
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only to smoke-test the script


def arch(hidden: int, layers: int, max_len: int) -> dict:
    heads = hidden // 64
    return {
        "hidden_size": hidden,
        "intermediate_size": hidden * 8 // 3 // 64 * 64 + 64,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": max_len,
        "tie_word_embeddings": False,
    }


def module_on_gpu(spec: dict, impl: str = "sdpa", **kwargs) -> BillaLM:
    torch.manual_seed(0)
    module = BillaLM(
        model={"architecture": spec, "pretrained_path": None},
        vocab_size=VOCAB,
        optimizer={},
        scheduler={},
        total_steps=1,
        **kwargs,
    )
    config = llama_config(spec, VOCAB)
    config._attn_implementation = impl
    module.model = LlamaForCausalLM(config).to(DEVICE)
    return module


def samples(n: int, max_len: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(16, max_len // 2, (1,), generator=g))
        ids = [1, *torch.randint(3, VOCAB, (length - 1,), generator=g).tolist()]
        cut = length // 3
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def to_cuda(batch: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_losses() -> None:
    items = samples(12, 256)
    packed = PackCollator(0, 256)(items)
    impls = ["sdpa"]
    try:
        import flash_attn  # noqa: F401

        impls.append("flash_attention_2")
    except ImportError:
        print("flash_attn not installed: flash-attention 2 not checked")
    for impl in impls:
        module = module_on_gpu(arch(256, 2, 256), impl if impl == "sdpa" else "sdpa")
        module.model.eval()
        dtype = torch.float32 if impl == "sdpa" else torch.bfloat16
        module.model.to(dtype)
        with torch.no_grad():
            reference = module.token_nll(to_cuda(PadCollator(0)(items)))[0].sort().values
            module.model.config._attn_implementation = impl
            layout = packed_layout("cuda", impl)
            nll = module.token_nll(to_cuda(feed_packed(packed, layout)))[0].sort().values
            masked = module.token_nll(to_cuda(packed))[0].sort().values if impl == "sdpa" else reference
        assert nll.shape == reference.shape, (nll.shape, reference.shape)
        diff = (nll - reference).abs().max().item()
        print(
            f"losses {impl} ({dtype}): layout {layout}: {nll.numel()} label tokens, max |packed - unpacked| "
            f"{diff:.2e} (4D mask: {(masked - reference).abs().max().item():.2e}), mean {nll.mean().item():.4f}"
        )
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        assert diff < tol, f"{impl}: packed losses differ from unpacked by {diff}"


class _SeenMask(L.Callback):
    def __init__(self):
        self.masks = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.masks.append(batch["attention_mask"])


def check_fit() -> None:
    spec = arch(256, 2, 512)
    optimizer = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "fused": True}
    scheduler = {"_target_": "billa.model.schedule.cosine_with_warmup", "_partial_": True, "warmup_steps": 1}
    module = BillaLM(
        model={"architecture": spec, "pretrained_path": None},
        vocab_size=VOCAB,
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=3,
        validate_at_start=False,
        clip_grad_norm=2.0,
    )
    seen = _SeenMask()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = quiet_trainer(
            accelerator="gpu" if DEVICE == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed",
            max_steps=3,
            gradient_clip_val=None,
            callbacks=[seen],
            default_root_dir=tmp,
        )
        trainer.fit(
            module, DataLoader(samples(24, 512), batch_size=8, collate_fn=PackCollator(0, 512, mask=DEVICE == "cpu"))
        )
    assert DEVICE == "cpu" or all(mask is None for mask in seen.masks), "a 4D mask reached the GPU"
    assert trainer.optimizers[0].defaults["fused"] is True
    print(
        f"bf16-mixed fit on {DEVICE}: 3 steps, fused AdamW, billa clipping, grad norm "
        f"{module._grad_norm:.3f}, attn {module.model.config._attn_implementation}, no 4D mask reached the GPU"
    )


def time_layouts(batch: int, seq: int, hidden: int, layers: int) -> None:
    module = module_on_gpu(arch(hidden, layers, seq))
    items = samples(batch * 3, seq * 2)  # ~3 samples per row
    packed = PackCollator(0, seq)(items)
    for layout in ("mask", "position_ids"):
        data = to_cuda(feed_packed(packed, layout))
        times = []
        for _ in range(6):
            sync()
            start = time.perf_counter()
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
                loss = module.model_step(data)
            loss.backward()
            sync()
            times.append(time.perf_counter() - start)
            module.model.zero_grad(set_to_none=True)
        best = sorted(times[2:])[len(times[2:]) // 2]
        print(
            f"packed {tuple(packed['input_ids'].shape)} LLaMA {layers}x{hidden} fwd+bwd, "
            f"{layout:12s}: {best * 1e3:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    check_losses()
    check_fit()
    time_layouts(args.batch, args.seq, args.hidden, args.layers)


if __name__ == "__main__":
    main()
