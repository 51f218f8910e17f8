"""Class balance of a data set's masks: weights that lift rare classes (loss.class_weights=auto)."""

from __future__ import annotations

import torch


def median_frequency_weights(pixel_counts: torch.Tensor) -> list[float]:
    """Median-frequency balancing (Eigen & Fergus): w_c = median(f) / f_c; absent classes get 0."""
    freq = pixel_counts.double() / pixel_counts.sum().clamp_min(1)
    present = freq > 0
    median = freq[present].median() if present.any() else torch.tensor(1.0, dtype=torch.float64)
    weights = torch.where(present, median / freq.clamp_min(1e-12), torch.zeros_like(freq))
    return [round(float(w), 6) for w in weights]
