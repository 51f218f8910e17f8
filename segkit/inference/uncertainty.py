"""How sure is the model, from several predictions of one image: TTA variance and MC dropout.

`uncertainty_method` chooses where the per-pixel uncertainty comes from:

  softmax       one prediction (the TTA mean when TTA is on); confidence and entropy of its probabilities
                (segkit.inference.calibration). No variance map. Today's behaviour and the default.
  tta_variance  the TTA views (tta_scales x flip), each brought back to the input size as the mean is;
                the prediction is their mean (the same as plain TTA), the spread is their variance.
  mc_dropout    `mc_samples` passes with the dropout layers sampling (Gal & Ghahramani 2016) and BatchNorm
                in eval mode; the prediction is the mean of the passes, the spread their variance.

The variance map is the total variance of the class probabilities across the samples,
sum_c Var(p_c), divided by its largest possible value 1 - 1/C (reached when every sample is one-hot
and the samples are spread evenly over all C classes): 0 = the samples agree exactly, 1 = they
disagree as much as probabilities can. Samples are accumulated one at a time (Welford: a running
sum and sum of squared deviations), so memory does not grow with their number.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from segkit.errors import ConfigError
from segkit.inference.calibration import confidence_and_entropy
from segkit.models.sliding import predict_probs, tta_views

METHODS = ("softmax", "tta_variance", "mc_dropout")
DEFAULT_MC_SAMPLES = 8


class Moments:
    """Running mean and spread of probability maps (B, C, H, W), one sample at a time."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None  # sum of squared deviations from the running mean
        self.count = 0

    def add(self, probs: torch.Tensor) -> None:
        self.count += 1
        if self.total is None or self.squares is None:
            self.total, self.squares = probs, torch.zeros_like(probs)
            return
        delta = probs - self.total / (self.count - 1)
        # total + probs, not in place: the mean is then bit for bit predict_probs' (the same additions)
        self.total = self.total + probs
        self.squares += delta * (probs - self.total / self.count)

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no samples")
        return self.total / self.count

    def variance(self) -> torch.Tensor:
        """(B, H, W) in [0, 1]: sum over classes of the variance across samples, over its maximum 1 - 1/C."""
        if self.squares is None:
            raise ValueError("no samples")
        classes = self.squares.shape[1]
        total_variance = self.squares.sum(1) / self.count
        return (total_variance / (1 - 1 / classes)).clamp(0, 1) if classes > 1 else torch.zeros_like(total_variance)


def stochastic_layers(model: nn.Module) -> list[nn.Module]:
    """The dropout layers that actually drop: nn.Dropout* and timm's DropPath / DropBlock with p > 0.

    Dropout called functionally inside a block (F.dropout(x, p, self.training)) is not found, so it stays
    off: putting whole blocks in train mode would also switch their BatchNorm to batch statistics."""
    from timm.layers import DropBlock2d, DropPath

    def drops(module: nn.Module) -> bool:
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return module.p > 0
        return isinstance(module, (DropPath, DropBlock2d)) and module.drop_prob > 0

    return [module for module in model.modules() if drops(module)]


def check_model(model: nn.Module, method: str) -> list[nn.Module]:
    """The layers mc_dropout samples with; a one-line error when there are none (other methods: [])."""
    if method != "mc_dropout":
        return []
    layers = stochastic_layers(model) if isinstance(model, nn.Module) else []
    if not layers:
        raise ConfigError("uncertainty_method", "mc_dropout needs dropout, and this model has no dropout layer "
                          "(nn.Dropout*, timm DropPath with p > 0), so every pass would be the same: zero "
                          "variance; use uncertainty_method=tta_variance (with tta=true) or softmax")
    return layers


@contextmanager
def dropout_sampling(model: nn.Module) -> Iterator[int]:
    """Only the dropout layers in train mode (BatchNorm and the rest stay in eval), restored on exit."""
    layers = check_model(model, "mc_dropout")
    modes = [layer.training for layer in layers]
    try:
        for layer in layers:
            layer.train()
        yield len(layers)
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.train(mode)


def check_method(method: str, tta_scales: Sequence[float], tta_flip: bool, mc_samples: int) -> None:
    """One-line errors for a method that cannot give a spread with these settings."""
    if method not in METHODS:
        raise ConfigError("uncertainty_method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    views = len(tta_scales) * (2 if tta_flip else 1)
    if method == "tta_variance" and views < 2:
        raise ConfigError("uncertainty_method", "tta_variance needs several TTA views (tta=true with more than "
                          "one tta_scales or tta_flip=true); one view has zero variance")
    if method == "mc_dropout" and mc_samples < 2:
        raise ConfigError("mc_samples", f"must be at least 2 for mc_dropout, got {mc_samples}")


@torch.no_grad()
def sampled_probs(
    model: nn.Module,
    images: torch.Tensor,
    method: str,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    tta_scales: Sequence[float] = (1.0,),
    tta_flip: bool = False,
    mc_samples: int = DEFAULT_MC_SAMPLES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean probabilities (B, C, H, W) and the normalised variance (B, H, W) across the method's samples.

    tta_variance: the samples are the TTA views. mc_dropout: each sample is one stochastic pass (the TTA
    mean of its views when TTA is on). Images are already at the training scale, as for predict_probs."""
    check_method(method, tta_scales, tta_flip, mc_samples)
    moments = Moments()
    if method == "tta_variance":
        for probs in tta_views(model, images, mode, crop_size, stride, tta_scales, tta_flip):
            moments.add(probs)
    elif method == "mc_dropout":
        with dropout_sampling(model):
            for _ in range(mc_samples):
                moments.add(predict_probs(model, images, mode, crop_size, stride, tta_scales, tta_flip))
    else:
        raise ConfigError("uncertainty_method", "softmax has one prediction, no samples to take a variance of")
    return moments.mean(), moments.variance()


@dataclass
class Uncertainty:
    """Probabilities at the images' own size and the uncertainty maps derived from them."""

    probs: torch.Tensor  # (B, C, H, W): the mean over the samples; the prediction is their argmax
    variance: torch.Tensor | None = None  # (B, H, W) in [0, 1]; None for uncertainty_method=softmax

    def maps(self) -> dict[str, torch.Tensor]:
        """confidence, entropy (normalised by log C) and, when sampled, variance: each (B, H, W) in [0, 1]."""
        confidence, entropy = confidence_and_entropy(self.probs)
        maps = {"confidence": confidence, "entropy": entropy}
        if self.variance is not None:
            maps["variance"] = self.variance
        return maps


def to_grey(values: torch.Tensor) -> torch.Tensor:
    """A map in [0, 1] as 8-bit greyscale: 255 = 1 (confidence 1, entropy log C, the largest variance)."""
    return (values.float().clamp(0, 1) * 255).round().to(torch.uint8)
