"""Losses: torch's cross-entropy, smp's dice/focal/tversky/lovasz, and a weighted sum of them.

Every loss takes logits (B, C, H, W) and int64 targets (B, H, W) and skips ignore_index pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from segkit.errors import ConfigError


class CrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy with class weights given as a list (or computed from the data for 'auto')."""

    def __init__(
        self, ignore_index: int = 255, class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0
    ) -> None:
        if isinstance(class_weights, str):
            raise ConfigError("loss.class_weights", f"{class_weights!r} must be resolved before building the loss")
        weight = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights is not None else None
        super().__init__(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)


class WeightedSum(nn.Module):
    """sum_i weight_i * loss_i, e.g. ce + dice."""

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        weights = dict(weights or {})
        unknown = set(weights) - set(self.terms)
        if unknown:
            raise ConfigError("loss.weights", f"names {sorted(unknown)} are not loss terms {sorted(self.terms)}")
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.terms}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * term(logits, target) for name, term in self.terms.items())


def median_frequency_weights(pixel_counts: torch.Tensor) -> list[float]:
    """Median-frequency balancing (Eigen & Fergus): w_c = median(f) / f_c; absent classes get 0."""
    freq = pixel_counts.double() / pixel_counts.sum().clamp_min(1)
    present = freq > 0
    median = freq[present].median() if present.any() else torch.tensor(1.0, dtype=torch.float64)
    weights = torch.where(present, median / freq.clamp_min(1e-12), torch.zeros_like(freq))
    return [round(float(w), 6) for w in weights]


def needs_class_weights(node: object) -> bool:
    """Whether any loss term in the config asks for class_weights: auto."""
    if isinstance(node, Mapping):
        return node.get("class_weights") == "auto" or any(needs_class_weights(v) for v in node.values())
    return False


def fill_class_weights(node: object, weights: list[float]) -> object:
    """A copy of the loss config with every class_weights: auto replaced by `weights`."""
    if isinstance(node, Mapping):
        return {
            k: (weights if k == "class_weights" and v == "auto" else fill_class_weights(v, weights))
            for k, v in node.items()
        }
    return node
