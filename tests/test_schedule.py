"""The cosine-with-warmup schedule at hand-computed steps, through a real optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from billa.model.schedule import cosine_warmup_factor, cosine_with_warmup


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.1),  # BiLLa's warmup: (s + 1) / warmup, so the first step trains at lr / 10, not 0
        (4, 0.5),  # halfway through a 10-step warmup
        (9, 1.0),  # the last warmup step reaches the peak
        (10, 1.0),  # cosine starts at the peak
        (60, 0.1 + 0.9 * 0.5),  # halfway through the cosine: (1 + cos(pi/2)) / 2 = 0.5
        (35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))),
        (110, 0.1),  # the end: min_lr_ratio
        (500, 0.1),  # past the end it stays there
    ],
)
def test_factor_at_steps(step, expected):
    assert cosine_warmup_factor(step, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) == pytest.approx(expected)


def test_scheduler_drives_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=3e-5)
    scheduler = cosine_with_warmup(optimizer, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    seen = {}
    for step in range(111):
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(3e-6)  # lr x (0 + 1) / 10
    assert seen[3] == pytest.approx(1.2e-5)  # lr x (3 + 1) / 10
    assert seen[10] == pytest.approx(3e-5)
    assert seen[60] == pytest.approx(3e-5 * 0.55)
    assert seen[110] == pytest.approx(3e-6)
    assert all(seen[s] >= seen[s + 1] for s in range(10, 110))  # monotone after warmup
