"""ZeRO-3 checkpoint (a Lightning + DeepSpeed checkpoint directory) -> Hugging Face model directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from billa.distributed.checkpoints import resolve_ckpt_path
from billa.distributed.safe_load import check_checkpoint, weights_only_loading
from billa.export import save_hf_model
from billa.model.builders import llama_config
from billa.utils.logging import get_logger

log = get_logger(__name__)

TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under


def _hyperparameters(ckpt: Path) -> dict:
    states = ckpt / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt"  # rank 0 holds the client state
    if not states.is_file():
        raise FileNotFoundError(
            f"{ckpt}: no {TAG}/zero_pp_rank_0_mp_rank_00_model_states.pt: not a DeepSpeed checkpoint directory"
        )
    client = torch.load(states, map_location="cpu", weights_only=True)
    hparams = client.get("hyper_parameters")
    if not hparams or "model" not in hparams:
        raise ValueError(f"{states}: no billa hyper_parameters (was it written by billa's train.py?)")
    return hparams


def zero_to_hf(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: str | None = None,
    max_shard_size: str = "5GB",
    trust_checkpoint: bool = False,
) -> dict:
    """Consolidate the fp32 weights of a ZeRO checkpoint and write a HF directory with the run's tokenizer.

    Args:
        checkpoint: a checkpoint directory (``step=NNNNNN.ckpt``), a run's ``checkpoints/`` directory or its output
            directory (the newest complete checkpoint is taken).
        out_dir: the HF directory to write.
        tokenizer: tokenizer directory; default the one the run trained with (saved in the checkpoint).
        trust_checkpoint: load the shards with ``weights_only=False`` (only for checkpoints from someone you
            trust: a crafted pickle runs code). By default every shard is checked and loaded weights-only.
    """
    ckpt = Path(resolve_ckpt_path(str(checkpoint), None, checkpoint))
    check_checkpoint(ckpt, "op.checkpoint", trust_checkpoint, "op.trust_checkpoint")
    hparams = _hyperparameters(ckpt)
    tokenizer_dir = tokenizer or hparams.get("tokenizer_dir")
    if not tokenizer_dir or not Path(tokenizer_dir, "tokenizer.model").is_file():
        raise FileNotFoundError(f"tokenizer directory {tokenizer_dir!r} not found: pass op.tokenizer=<dir>")
    log.info("Consolidating %s", ckpt)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # slow import: after checks

    with weights_only_loading(trust_checkpoint):  # DeepSpeed's own torch.load calls become weights-only
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
    state = {k.removeprefix("model."): v for k, v in state.items()}  # BillaLM.model -> the HF model's own keys
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(hparams["model"]["architecture"], hparams["vocab_size"]))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"{ckpt}: checkpoint keys do not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    out = save_hf_model(model, tokenizer_dir, out_dir, max_shard_size=max_shard_size)
    return {"checkpoint": str(ckpt), "out_dir": out, "parameters": sum(v.numel() for v in state.values())}
