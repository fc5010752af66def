"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` x peak (docs/recipe.md, "Optimiser")."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_warmup_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer ``step`` (0-based): ``(step + 1)/warmup`` in warmup, then cosine to ``min_lr_ratio``.

    As BiLLa's ColossalAI ``CosineAnnealingWarmupLR``: the first step already trains at ``lr/warmup`` (not 0) and
    step ``warmup - 1`` reaches the peak; at ``step >= total_steps`` the factor is ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 2000, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """A ``LambdaLR`` stepping once per optimizer step (Lightning ``interval: step``)."""
    return LambdaLR(optimizer, lambda step: cosine_warmup_factor(step, warmup_steps, total_steps, min_lr_ratio))
