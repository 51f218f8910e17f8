"""How sure is the model? Confidence and entropy per pixel, expected calibration error with its
reliability diagram, and temperature scaling (Guo et al. 2017) fitted on a validation split.

Confidence = the largest softmax probability; entropy = -sum p log p / log C, in [0, 1]. ECE bins
the confidences of the valid pixels into `n_bins` equal-width bins (as torchmetrics'
MulticlassCalibrationError) and sums |accuracy - confidence| weighted by each bin's share of pixels.
Temperature scaling divides the logits by one T > 0 that minimises the cross-entropy of held-out
pixels: argmax (the masks) is unchanged, the probabilities become honest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_BINS = 15


def confidence_and_entropy(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (B, C, H, W) -> confidence (B, H, W) and entropy normalised by log C (B, H, W), both in [0, 1]."""
    confidence = probs.amax(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return confidence, (entropy / math.log(probs.shape[1])).clamp(0, 1) if probs.shape[1] > 1 else entropy


class ReliabilityBins:
    """Per-bin pixel counts, summed confidences and summed correctness, accumulated on the device."""

    def __init__(self, n_bins: int = DEFAULT_BINS, device: torch.device | str = "cpu") -> None:
        self.n_bins = n_bins
        self.boundaries = torch.linspace(0, 1, n_bins + 1, device=device)
        self.count = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.confidence = torch.zeros_like(self.count)
        self.correct = torch.zeros_like(self.count)

    def update(self, probs: torch.Tensor, target: torch.Tensor, ignore_index: int | None = 255) -> None:
        confidence, pred = probs.float().max(1)
        valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        confidence, correct = confidence[valid], (pred == target)[valid]
        index = (torch.bucketize(confidence, self.boundaries, right=True) - 1).clamp(0, self.n_bins - 1)
        self.count.index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))
        self.confidence.index_add_(0, index, confidence.double())
        self.correct.index_add_(0, index, correct.double())

    def compute(self) -> dict[str, Any]:
        """{"ece", "n_bins", "pixels", "bins": [{lower, upper, count, confidence, accuracy}]} (plain numbers)."""
        count, total = self.count.cpu(), float(self.count.sum())
        confidence = (self.confidence.cpu() / count.clamp_min(1)).tolist()
        accuracy = (self.correct.cpu() / count.clamp_min(1)).tolist()
        ece = float((self.correct.cpu() - self.confidence.cpu()).abs().sum() / total) if total else 0.0
        edges = self.boundaries.cpu().tolist()
        bins = [
            {"lower": edges[i], "upper": edges[i + 1], "count": int(count[i]),
             "confidence": confidence[i] if count[i] else None, "accuracy": accuracy[i] if count[i] else None}
            for i in range(self.n_bins)
        ]
        return {"ece": ece, "n_bins": self.n_bins, "pixels": int(total), "bins": bins}


@dataclass
class PixelSample:
    """A random subset of the valid pixels' logits and targets, kept for fitting the temperature."""

    keep_probability: float
    generator: torch.Generator
    logits: list[torch.Tensor]
    targets: list[torch.Tensor]

    @classmethod
    def create(cls, max_pixels: int, expected_pixels: int, seed: int = 0) -> PixelSample:
        probability = min(1.0, max_pixels / max(1, expected_pixels))
        return cls(probability, torch.Generator().manual_seed(seed), [], [])

    def add(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = 255) -> None:
        flat_logits = logits.float().permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).cpu()
        flat_target = target.reshape(-1).cpu()
        keep = torch.rand(flat_target.shape, generator=self.generator) < self.keep_probability
        if ignore_index is not None:
            keep &= flat_target != ignore_index
        self.logits.append(flat_logits[keep])
        self.targets.append(flat_target[keep])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.logits), torch.cat(self.targets)


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising cross_entropy(logits / T, target) (L-BFGS on log T, so T stays positive)."""
    if target.numel() == 0:
        raise ValueError("no valid pixels to fit a temperature on")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    logits64, target = logits.double(), target.long()
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits64 / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def ece_of(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, n_bins: int = DEFAULT_BINS) -> float:
    """ECE of (N, C) logits divided by `temperature` against (N,) targets (all valid)."""
    bins = ReliabilityBins(n_bins)
    bins.update((logits.float() / temperature).softmax(1)[..., None, None], target[:, None, None], None)
    return float(bins.compute()["ece"])
