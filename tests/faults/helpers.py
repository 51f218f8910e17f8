"""Losses that misbehave on purpose, addressable from configs as `tests.faults.helpers.X`."""

from __future__ import annotations

import torch
from torch import nn


class NaNLoss(nn.Module):
    """Cross-entropy, but NaN from the `start`-th call on."""

    def __init__(self, ignore_index: int = 255, start: int = 0, **_ce_options: object) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(ignore_index=ignore_index)
        self.start, self.calls = start, 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.ce(logits, target)
        return loss * float("nan") if self.calls > self.start else loss
