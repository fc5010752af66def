"""``model.kernels``: Liger Kernel's fused RMSNorm, rotary and SwiGLU on CUDA, transformers' modules anywhere else."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from billa.config import ConfigError, select_kernels, validate

from .helpers import TINY_ARCH, run_door, tiny_module

VOCAB = 97


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 24), generator=g)  # (B, T)
    labels = input_ids.clone()
    labels[:, :5] = -100  # a prompt
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _module(kernels: str, **kwargs):
    return tiny_module(
        {"architecture": TINY_ARCH, "pretrained_path": None, "kernels": kernels}, VOCAB, seed=0, **kwargs
    )


@pytest.mark.parametrize(
    "requested,cuda,importable,compile_layers,expected",
    [
        ("auto", True, True, False, "liger"),  # the GPU run with the cuda extra installed
        ("auto", False, True, False, "torch"),  # CPU: unchanged, even with the package installed
        ("auto", True, False, False, "torch"),  # CUDA without the package
        ("auto", True, True, True, "torch"),  # compile=true: inductor fuses the same operations
        ("liger", True, True, False, "liger"),
        ("torch", True, True, False, "torch"),
        ("torch", False, False, True, "torch"),
    ],
)
def test_kernel_selection(requested, cuda, importable, compile_layers, expected):
    """Bugs caught: ``auto`` taking Liger on a CPU run (Triton kernels on CPU tensors fail at the first step), on a
    machine without the package (ImportError after the tokenisation pass) or on top of compiled layers; ``auto``
    never taking Liger on a GPU that has it (the option with no effect); ``torch`` not honoured."""
    assert select_kernels(requested, cuda, importable, compile_layers) == expected


@pytest.mark.parametrize(
    "requested,cuda,importable,compile_layers,message",
    [
        ("liger", False, True, False, r"`model.kernels`=liger needs CUDA.*model.kernels=torch"),
        ("liger", True, False, False, r"liger_kernel package is not installed: pip install -e \"\.\[cuda\]\""),
        ("liger", True, True, True, r"`model.kernels`=liger with `compile`=true.*compile=false"),
        ("fused", True, True, False, r"`model.kernels`='fused': expected auto .*, liger or torch"),
    ],
)
def test_liger_where_it_cannot_run_is_refused(requested, cuda, importable, compile_layers, message):
    """Bugs caught: an explicit ``liger`` request silently downgraded to torch kernels on CPU or without the package
    (a benchmark of ``liger`` against ``torch`` comparing torch with itself), and a misspelt value read as auto."""
    with pytest.raises(ConfigError, match=message):
        select_kernels(requested, cuda, importable, compile_layers)


def test_validate_refuses_liger_on_the_cpu_hardware(compose):
    """Bug caught: ``model.kernels`` never checked by ``validate`` (the mistake found in ``configure_model``, after the
    tokenisation pass and inside every rank)."""
    with pytest.raises(ConfigError, match="`model.kernels`=liger needs CUDA"):
        validate(compose(["model.kernels=liger"]))
    validate(compose(["model.kernels=torch"]))


def test_auto_on_cpu_keeps_transformers_modules_and_the_same_loss():
    """``kernels=auto`` on CPU builds exactly what ``kernels=torch`` builds: the same loss and gradients, bit for bit,
    and no module's ``forward`` or transformers' rotary function replaced.

    Bug caught: the CPU path changed by the kernel selection (Liger applied, or a patched module left behind).
    """
    from transformers.models.llama import modeling_llama

    rotary = modeling_llama.apply_rotary_pos_emb
    auto, plain = _module("auto"), _module("torch")
    assert auto.kernels == plain.kernels == "torch"
    for layer in auto.model.model.layers:
        patched = [
            m for m in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm) if "forward" in vars(m)
        ]
        assert not patched, patched
    assert modeling_llama.apply_rotary_pos_emb is rotary
    losses = []
    for module in (auto, plain):
        loss = module.model_step(_batch())
        loss.backward()
        losses.append(loss.detach())
    assert losses[0].shape == () and torch.equal(losses[0], losses[1])
    for (name, ours), theirs in zip(auto.model.named_parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(ours.grad, theirs.grad), name


def test_liger_on_cpu_stops_train_py_with_a_billa_error(tmp_path):
    """``python train.py model.kernels=liger`` on the CPU hardware: one ``billa: error:`` block naming the key and the
    fix, exit 2, no traceback.

    Bug caught: an explicit ``liger`` on CPU silently downgraded to torch kernels (the run trains and exits 0).
    """
    result = run_door(
        "train.py",
        "model.kernels=liger",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"BILLA_CACHE_DIR": str(tmp_path / "cache")},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    blocks = [line for line in result.stderr.splitlines() if line.startswith("billa: error:")]
    assert len(blocks) == 1 and "`model.kernels`=liger needs CUDA" in blocks[0], result.stderr[-3000:]
    assert "model.kernels=torch" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="needs CUDA and liger_kernel (pip install -e '.[cuda]')",
)
def test_liger_gives_the_torch_loss_on_cuda_to_bf16_tolerance(monkeypatch):
    """On a GPU: Liger's kernels give transformers' loss and gradients to bf16 tolerance, and really run.

    Bugs caught: Liger's RMSNorm with the wrong epsilon or casting mode, a SwiGLU that drops the gate, a rotary
    function left unpatched (``auto`` then measures torch's kernels).
    """
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.llama import modeling_llama

    from billa.model.builders import apply_liger_kernels

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger patches these process-wide: restored
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))  # after the test
    batch = {key: value.cuda() for key, value in _batch().items()}
    torch_module = _module("torch").cuda().to(torch.bfloat16)
    liger_module = _module("torch").cuda()
    apply_liger_kernels(liger_module.model)
    liger_module = liger_module.to(torch.bfloat16)
    assert modeling_llama.apply_rotary_pos_emb is liger_rotary_pos_emb
    assert all("forward" in vars(layer.mlp) for layer in liger_module.model.model.layers)
    losses = []
    for module in (torch_module, liger_module):
        loss = module.model_step(batch)
        loss.backward()
        losses.append(loss.detach().float())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    for (name, ours), theirs in zip(
        liger_module.model.named_parameters(), torch_module.model.parameters(), strict=True
    ):
        torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), rtol=5e-2, atol=5e-3, msg=name)
