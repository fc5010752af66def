"""How packed rows reach the attention kernel: a T x T mask on CPU, sequence boundaries on GPU.

``PackCollator`` describes a packed row twice: ``position_ids`` restarting at 0 for every sample, and a
block-diagonal causal (R, 1, T, T) mask. The mask is what eager attention and the CPU need, but on a GPU it costs
R x T^2 x 4 bytes per micro batch (32 MiB at 8 x 1,024) and sends SDPA to its masked (slower) kernels. transformers
reads sample boundaries from the position ids instead (its flattening convention, as in
``DataCollatorWithFlattening``): with ``attention_mask=None``

- SDPA builds the block-diagonal mask on the device from the position ids (rows kept as they are);
- flash-attention runs its variable-length kernel on one flattened row (1, R x T) with ``cu_seqlens`` derived from
  the position ids; a row boundary is a position restart like any other, and padding (position 0 each) becomes
  sequences of length 1 that carry no label.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

MASK, POSITION_IDS, FLATTEN = "mask", "position_ids", "flatten"


def packed_layout(device_type: str, attn_implementation: str | None) -> str:
    """How packed rows are fed for this device and attention implementation.

    Returns:
        ``mask`` (the 4D mask; CPU, eager and any implementation not listed), ``position_ids`` (CUDA + SDPA) or
        ``flatten`` (CUDA + a flash-attention implementation: one (1, R x T) row, variable-length kernel).
    """
    impl = attn_implementation or "eager"
    if device_type != "cuda":
        return MASK
    if "flash" in impl:  # flash_attention_2, flash_attention_3, kernels-community/flash-attn...
        return FLATTEN
    if impl == "sdpa":
        return POSITION_IDS
    return MASK


def is_packed(batch: dict) -> bool:
    """A PackCollator batch: position ids and a 4D mask, or no mask at all (``PackCollator(mask=False)``)."""
    mask = batch.get("attention_mask")
    return batch.get("position_ids") is not None and (
        mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4)
    )


def feed_packed(batch: dict, layout: str) -> dict:
    """``batch`` as ``layout`` feeds it (a new dict; unpacked batches and ``mask`` come back unchanged).

    ``flatten`` also sets the label of every row's first token to -100: after flattening, the last token of row r
    would predict it, which the per-row shift never did (each row's first label is unused there).
    """
    if layout == MASK or not is_packed(batch) or batch["attention_mask"] is None:
        return batch  # a batch already fed by position ids stays so: transformers derives the mask from them
    batch = {**batch, "attention_mask": None}
    if layout == FLATTEN:
        labels = batch["labels"].clone()
        labels[:, 0] = IGNORE_INDEX
        batch["labels"] = labels.reshape(1, -1)  # (1, R*T)
        batch["input_ids"] = batch["input_ids"].reshape(1, -1)
        batch["position_ids"] = batch["position_ids"].reshape(1, -1)
    return batch
