"""Batching: right-pad a list of examples to the longest one."""

from __future__ import annotations

import torch

from billa.data.objectives import IGNORE


class PadCollator:
    """Pad ``input_ids`` with ``pad_id`` and ``labels`` with -100; build the attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if "source" in items[0]:
            batch["source"] = [item["source"] for item in items]  # for per-source token accounting
        return batch
