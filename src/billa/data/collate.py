"""Batching: truncate-and-pad per sample (BiLLa), or pack several samples into one sequence.

Both collators return ``input_ids``, ``labels`` and ``attention_mask`` for the model, plus ``source`` and
``sample_tokens`` (one entry per sample) for per-source accounting; ``step_label_tokens`` (training: the loss
normaliser of the optimizer step), ``label_group_tokens`` (``loss.normalization=rank_token_mean``: per token, the
label tokens of its sample's loss group, shape (B, T) like ``labels``) and ``label_chars`` (validation: for bits per
character) when the samples carry them.
"""

from __future__ import annotations

import torch

from billa.data.objectives import IGNORE


def _accounting(items: list[dict]) -> dict:
    batch = {"sample_tokens": [len(item["input_ids"]) for item in items]}
    if "source" in items[0]:
        batch["source"] = [item["source"] for item in items]
    if "label_chars" in items[0]:  # validation: characters the labelled tokens decode to (bits per character)
        batch["label_chars"] = torch.tensor([item["label_chars"] for item in items], dtype=torch.long)
    if "step_label_tokens" in items[0]:  # training: label tokens of the whole optimizer step (loss normaliser)
        totals = {item["step_label_tokens"] for item in items}
        if len(totals) != 1:
            raise ValueError(f"a micro batch spans several optimizer steps (step label totals {sorted(totals)})")
        batch["step_label_tokens"] = totals.pop()
    return batch


class PadCollator:
    """One sample per row: right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100; a 2D attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.as_tensor(item["input_ids"])
            labels[row, :n] = torch.as_tensor(item["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, **_accounting(items)}
        if "group_label_tokens" in items[0]:
            batch["label_group_tokens"] = torch.tensor([[item["group_label_tokens"]] * width for item in items])
        return batch


class PackCollator:
    """Pack the micro batch's samples into rows of at most ``max_len`` tokens (first-fit decreasing).

    Position ids restart at 0 for every sample, and a block-diagonal causal 4D mask (additive: 0 = attend,
    -inf = masked; shape (R, 1, T, T)) stops attention across samples, so each sample sees exactly what it would
    see alone. The first label of every sample after the first in a row is -100: the model must not learn to
    predict a sample's BOS from the previous sample. Padding tokens attend only to themselves.

    ``mask=False`` leaves ``attention_mask`` None: the position ids alone mark the samples (a GPU with SDPA or
    flash-attention, see ``billa.data.packing``), and no (R, T, T) mask is built on the CPU each step.
    """

    def __init__(self, pad_id: int, max_len: int, mask: bool = True):
        self.pad_id, self.max_len, self.mask = pad_id, max_len, mask

    def _bins(self, lengths: list[int]) -> list[list[int]]:
        bins: list[list[int]] = []
        space: list[int] = []
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            for b, free in enumerate(space):
                if lengths[index] <= free:
                    bins[b].append(index)
                    space[b] -= lengths[index]
                    break
            else:
                bins.append([index])
                space.append(self.max_len - lengths[index])
        return bins

    def __call__(self, items: list[dict]) -> dict:
        bins = self._bins([len(item["input_ids"]) for item in items])
        width = max(sum(len(items[i]["input_ids"]) for i in b) for b in bins)
        rows = len(bins)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)  # (R, T)
        labels = torch.full((rows, width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((rows, width), dtype=torch.long)
        segment = torch.full((rows, width), -1, dtype=torch.long)  # sample index per token; -1 = padding
        grouped = "group_label_tokens" in items[0]
        group_tokens = torch.zeros((rows, width), dtype=torch.long)  # (R, T): the loss group's label tokens
        for row, members in enumerate(bins):
            start = 0
            for k, index in enumerate(members):
                n = len(items[index]["input_ids"])
                input_ids[row, start : start + n] = torch.as_tensor(items[index]["input_ids"])
                labels[row, start : start + n] = torch.as_tensor(items[index]["labels"])
                if k:
                    labels[row, start] = IGNORE
                position_ids[row, start : start + n] = torch.arange(n)
                segment[row, start : start + n] = k
                if grouped:
                    group_tokens[row, start : start + n] = items[index]["group_label_tokens"]
                start += n
        mask = self._mask(segment) if self.mask else None
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": mask,
            **_accounting(items),
        }
        if grouped:
            batch["label_group_tokens"] = group_tokens
        return batch

    @staticmethod
    def _mask(segment: torch.Tensor) -> torch.Tensor:
        """Block-diagonal causal additive mask (R, 1, T, T) from each token's sample index (-1 = padding)."""
        width = segment.shape[1]
        same = segment[:, :, None] == segment[:, None, :]  # (R, T, T)
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        pad_self = (segment[:, :, None] < 0) & torch.eye(width, dtype=torch.bool)
        allowed = (same & causal & (segment[:, :, None] >= 0)) | pad_self
        return torch.zeros((segment.shape[0], 1, width, width)).masked_fill(~allowed[:, None], float("-inf"))
