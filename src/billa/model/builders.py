"""Model builders: a model config names an architecture and, optionally, pretrained weights (one place for both)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from billa.distributed.safe_load import pretrained_loading
from billa.utils.errors import ConfigError


def llama_config(architecture: Mapping, vocab_size: int, bos_id: int = 1, eos_id: int = 2) -> LlamaConfig:
    """A ``LlamaConfig`` from ``model.architecture`` with the tokenizer's vocabulary size."""
    return LlamaConfig(**dict(architecture), vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id)


def count_parameters(architecture: Mapping, vocab_size: int) -> int:
    """Parameter count of the architecture, computed on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(architecture, vocab_size))
    return sum(p.numel() for p in model.parameters())


def build_causal_lm(
    architecture: Mapping, vocab_size: int, pretrained_path: str | None = None, key: str = "model.pretrained_path"
) -> PreTrainedModel:
    """Random-init LLaMA from ``architecture``, or load ``pretrained_path`` and check its vocabulary.

    Args:
        architecture: LlamaConfig fields (``model.architecture``).
        vocab_size: the tokenizer's size; the model's embedding must have at least this many rows.
        pretrained_path: HF model directory, or None for random init (seed first).
        key: the config key that named ``pretrained_path``, for error messages.
    """
    if pretrained_path is None:
        return random_init_llama(llama_config(architecture, vocab_size))
    with pretrained_loading(pretrained_path, key):  # billa's message for untrusted .bin weights, not torch's
        model = AutoModelForCausalLM.from_pretrained(pretrained_path, dtype=torch.float32)
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitioned weights report their full shape there
    if rows < vocab_size:
        raise ConfigError(
            f"{key}={pretrained_path} has {rows} embedding rows but the tokenizer has {vocab_size} pieces: "
            "expand the model's vocabulary first (vocabulary expansion resizes embeddings and lm_head)"
        )
    return model


def add_residual_dropout(model: PreTrainedModel, p: float) -> int:
    """Dropout on each decoder layer's attention and MLP outputs before they join the residual stream.

    BiLLa's training model does ``h = x + dropout(attention(norm(x)))`` and ``out = h + dropout(mlp(norm(h)))`` with
    p = 0.05; transformers' LLaMA has no such dropout, so forward hooks add it (active in train mode only; the
    exported model is unchanged). Returns the number of hooks registered (2 per layer; 0 when ``p == 0``).
    """
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"model.residual_dropout={p}: expected a probability in [0, 1)")
    if p == 0.0:
        return 0

    def attention_hook(module, args, output):  # LlamaAttention returns (attn_output, attn_weights)
        return (F.dropout(output[0], p, module.training), *output[1:])

    def mlp_hook(module, args, output):
        return F.dropout(output, p, module.training)

    hooks = 0
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(attention_hook)
        layer.mlp.register_forward_hook(mlp_hook)
        hooks += 2
    return hooks


def compile_decoder_layers(model: PreTrainedModel) -> int:
    """``torch.compile`` each decoder layer in place (regional compilation); returns the number of layers compiled.

    The layers share one class, so dynamo compiles the layer once and reuses the graph for every other (parameters
    are graph inputs): compile time is one layer's, whatever the depth. Inside a layer inductor fuses what
    transformers runs as separate kernels (RMSNorm in fp32, rotary, SiLU x up, residual adds); the attention stays
    SDPA's kernel. The embedding, the final norm and billa's label-position loss (boolean indexing, chunks) stay eager,
    outside any graph. ``Module.compile`` keeps parameter names, so checkpoints and exports are unchanged; activation
    checkpointing and the residual-dropout hooks go on working. Compilation happens at the first forward pass.

    With activation checkpointing, transformers checkpoints inside the layer's ``forward``, so dynamo traces
    ``torch.utils.checkpoint`` as a higher-order op, which refuses any mutation of state outside the layer. Since
    transformers 5.25 the ``kernels`` package is a hard dependency and its ``use_kernelized_func`` wrapper around
    ``LlamaAttention.forward`` sets and resets a module-level context variable on every call: dynamo then ran every
    checkpointed layer eagerly, capturing no graph and raising nothing. That variable only routes the rotary function
    to a hub kernel and holds no tensor state, so not replaying its set/reset in the backward recomputation changes
    no number; dynamo's ``skip_fwd_side_effects_in_bwd_under_checkpoint`` (a process-wide setting, read whenever a
    layer is traced or retraced) allows exactly that.
    """
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # absent in older torch
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in model.model.layers:
        layer.compile()
    return len(model.model.layers)


def apply_liger_kernels(model: PreTrainedModel) -> None:
    """Liger Kernel's fused Triton kernels for RMSNorm, rotary and SwiGLU in a built LLaMA (``model.kernels``: liger).

    The instance's RMSNorm and MLP modules keep their parameters and names and get Liger's ``forward`` (checkpoints,
    exports, the residual-dropout hooks and ZeRO-3's per-module gather hooks are unchanged); the rotary function is
    replaced in ``transformers.models.llama.modeling_llama``, which, like the RMSNorm and MLP classes, is process-wide:
    a LLaMA built later in the same process uses Liger too. The loss stays billa's (``HeadNLL``): Liger's cross-entropy
    and fused linear cross-entropy are not used. CUDA only (``billa.model.kernels.select_kernels`` decides).
    """
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model
    )


def random_init_llama(config: LlamaConfig) -> LlamaForCausalLM:
    """A randomly initialised LLaMA: the same weights for the same seed, in one process or partitioned by ZeRO-3.

    Inside DeepSpeed's partitioning context (``deepspeed.zero.Init``, entered by Lightning around ``configure_model``)
    every submodule's parameters are partitioned as soon as it is built, so transformers' ``_init_weights`` would
    write into empty tensors (embedding std 1.0 instead of ``initializer_range``). Here construction skips all
    initialisation, then ``_init_weights`` runs once per module in transformers' order: on the full tensors in one
    process, or on rank 0 inside ``GatheredParameters`` (broadcast and re-partitioned on exit) under ZeRO-3. Rank 0
    draws exactly the random numbers one process draws.
    """
    from transformers import initialization

    with initialization.no_init_weights():
        model = LlamaForCausalLM(config)
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # partitioned by deepspeed.zero.Init
        from transformers.integrations.deepspeed import initialize_weights_zero3

        initialize_weights_zero3(model)
    else:
        model.initialize_weights()
    model.tie_weights()
    return model
