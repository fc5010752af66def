"""``compile=true``: each decoder layer compiled on its own, the same loss and gradients, refused under DeepSpeed."""

from __future__ import annotations

import pytest
import torch

from billa.config import ConfigError, complete, plan_hardware, validate
from billa.model.module import BillaLM
from billa.train import run_time_values

from .helpers import tiny_module

VOCAB = 97


def _module(architecture, **kwargs) -> BillaLM:
    return tiny_module(architecture, VOCAB, seed=0, **kwargs)


def test_compile_key_reaches_the_module(compose):
    """Bug caught: a `compile` key in conf/train.yaml that run() never hands to BillaLM (an option with no effect)."""
    for overrides, expected in (([], False), (["compile=true"], True)):
        cfg = compose(overrides)
        module = complete(cfg.module, run_time_values(cfg, plan_hardware(cfg), None, VOCAB))
        assert module.hparams.compile is expected


def test_only_the_decoder_layers_are_compiled(compose):
    """Bugs caught: the option accepted but nothing compiled, or the whole model compiled (the label-position loss's
    boolean indexing breaks the graph and every new batch width recompiles the full model, not one layer)."""
    architecture = compose([]).model.architecture
    module = _module(architecture, compile=True)
    layers = module.model.model.layers
    assert len(layers) == 4 and all(layer._compiled_call_impl is not None for layer in layers)
    outside = [module.model, module.model.model, module.model.model.embed_tokens, module.model.lm_head]
    assert all(part._compiled_call_impl is None for part in outside)
    assert all(layer._compiled_call_impl is None for layer in _module(architecture).model.model.layers)  # default off
    assert "model.layers.0.self_attn.q_proj.weight" in module.model.state_dict()  # names unchanged: exports load


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["compile=true", "hardware=cpu_zero3"], r"`compile`=true with a DeepSpeed `hardware.strategy`.*compile=false"),
        (["compile=yes"], r"`compile`='yes': expected true .* or false"),
    ],
)
def test_bad_compile_settings_stop_before_any_work(compose, overrides, message):
    """Bugs caught: compile=true under ZeRO-3 failing deep inside the first step (its parameter-gathering hooks run
    inside the compiled layers) after the whole tokenisation pass, and a misspelt boolean read as true."""
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def test_compile_composes_with_the_gpu_hardware(compose):
    validate(compose(["compile=true", "hardware=1xa100"]))


@pytest.mark.slow
def test_compiled_layers_give_the_same_loss_and_gradients(compose):
    """Compiled (with activation checkpointing) and eager steps agree on the tiny model, fp32 on CPU.

    Bugs caught: a compiled layer that changes the numbers (e.g. a mask or rotary input baked in as a constant,
    gradients lost through HF's checkpoint around the compiled call), a graph per layer instead of one shared
    graph (compile time growing with depth: 32 compilations for LLaMA-7B), and compile=true that silently runs
    eager: with transformers 5.25 the attention's ``kernels`` wrapper mutates a global inside the checkpointed
    forward, dynamo gave up on the checkpoint and captured no graph, and nothing failed. A graph break inside the
    layer (only part of it compiled) fails too. Inductor on CPU compiles C++ kernels: ~25 s on 2 cores, hence the
    slow tier.
    """
    from torch._dynamo.utils import counters

    architecture = compose([]).model.architecture
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 24), generator=g)  # (B, T)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 17:] = 0  # padding
    labels = input_ids.clone()
    labels[:, :6] = -100  # a prompt
    labels[attention_mask == 0] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    eager = _module(architecture)
    compiled = _module(architecture, compile=True, gradient_checkpointing=True)
    torch._dynamo.reset()
    counters.clear()
    losses = []
    for module in (eager, compiled):
        loss = module.model_step(batch)
        loss.backward()
        losses.append(loss.detach())
    assert counters["stats"]["unique_graphs"] == 1  # one graph for the 4 layers
    assert not counters["graph_break"], dict(counters["graph_break"])  # the whole layer in it, checkpoint included
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, ours), theirs in zip(compiled.model.named_parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
