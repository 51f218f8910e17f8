"""Losses: torch's cross-entropy, smp's dice/jaccard/focal/tversky/lovasz, the few smp lacks
(generalized Dice, OHEM cross-entropy, a BCE that averages over valid pixels only), and a weighted sum.

Every loss takes logits (B, C, H, W) and int64 targets (B, H, W) and skips ignore_index pixels.
Binary tasks (model.num_classes=1): logits (B, 1, H, W), targets 0/1 (conf/loss/dice_bce.yaml).
Each loss is registered here (segkit.registry) with its `mode`: binary (one logit per pixel) or
multiclass (one per class), which segkit.config.validate_config checks against model.num_classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segkit.errors import ConfigError
from segkit.registry import register


@register("loss")
class CrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy with class weights given as a list (or computed from the data for 'auto')."""

    mode = "multiclass"

    def __init__(
        self, ignore_index: int = 255, class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__(
            weight=_weight_tensor(class_weights), ignore_index=ignore_index, label_smoothing=label_smoothing
        )


@register("loss")
class WeightedSum(nn.Module):
    """sum_i weight_i * loss_i, e.g. ce + dice.

    `from_epoch` switches a term on at a given epoch (counted from 0, as in epochs.csv), e.g. Lovász for
    the last epochs only: `from_epoch: {lovasz: 84}`. Until then the term is not computed at all, so an
    expensive term costs nothing before it starts. The trainer calls `set_epoch` before each pass (and a
    resumed run at its epoch), so which terms count is a function of the epoch, never of the run's history.
    """

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None,
                 from_epoch: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        weights, from_epoch = dict(weights or {}), dict(from_epoch or {})
        for key, names in (("loss.weights", weights), ("loss.from_epoch", from_epoch)):
            unknown = set(names) - set(self.terms)
            if unknown:
                raise ConfigError(key, f"names {sorted(unknown)} are not loss terms {sorted(self.terms)}")
        if any(int(epoch) < 0 for epoch in from_epoch.values()):
            raise ConfigError("loss.from_epoch", f"epochs count from 0; got {from_epoch}")
        if from_epoch and all(name in from_epoch and int(from_epoch[name]) > 0 for name in self.terms):
            raise ConfigError("loss.from_epoch", "at least one term must count from epoch 0")
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.terms}
        self.from_epoch = {name: int(from_epoch.get(name, 0)) for name in self.terms}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def active_terms(self) -> list[str]:
        return [name for name in self.terms if self.from_epoch[name] <= self.epoch]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * self.terms[name](logits, target) for name in self.active_terms())


def _valid_mask(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    return target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)


@register("loss")
class BinaryCrossEntropy(nn.Module):
    """BCE on a single logit (B, 1, H, W) against 0/1 masks (B, H, W), averaged over non-ignored pixels.

    (smp's SoftBCEWithLogitsLoss zeroes ignored pixels but still divides by all of them.)
    """

    mode = "binary"

    def __init__(self, ignore_index: int | None = 255, pos_weight: float | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logit = logits[:, 0]
        valid = _valid_mask(target, self.ignore_index)
        pos_weight = None if self.pos_weight is None else logit.new_tensor(self.pos_weight)
        losses = F.binary_cross_entropy_with_logits(
            logit, (target == 1).to(logit.dtype), pos_weight=pos_weight, reduction="none"
        )
        return (losses * valid).sum() / valid.sum().clamp_min(1)


@register("loss")
class GeneralizedDice(nn.Module):
    """Generalized Dice loss (Sudre et al. 2017) over the batch, multiclass softmax.

    GDL = 1 - 2 sum_c w_c sum_i p_ci g_ci / sum_c w_c sum_i (p_ci + g_ci), w_c = 1 / (sum_i g_ci)^2,
    so rare classes weigh as much as common ones. A class absent from the batch's targets would get
    an infinite weight; it gets the largest finite weight instead (as MONAI does), so predicting it
    still costs. Ignored pixels count in neither sum.
    """

    mode = "multiclass"

    def __init__(self, ignore_index: int | None = 255, eps: float = 1e-7) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        valid = _valid_mask(target, self.ignore_index).unsqueeze(1)
        probs = logits.softmax(1) * valid
        onehot = F.one_hot(torch.where(valid[:, 0], target, 0), num_classes).permute(0, 3, 1, 2) * valid
        onehot = onehot.to(probs.dtype)
        dims = (0, 2, 3)
        target_sum = onehot.sum(dims)
        weights = 1.0 / target_sum.square()
        finite = torch.isfinite(weights)
        largest = torch.where(finite, weights, 0.0).amax()
        weights = torch.where(finite, weights, largest)
        intersection = (weights * (probs * onehot).sum(dims)).sum()
        denominator = (weights * (probs.sum(dims) + target_sum)).sum()
        return 1.0 - 2.0 * intersection / denominator.clamp_min(self.eps)


@register("loss")
class OhemCrossEntropy(nn.Module):
    """Cross-entropy over the hard pixels only (online hard example mining, as MMSeg and PaddleSeg).

    A pixel is hard when the probability of its true class is below `threshold`; at least `min_kept`
    of the valid pixels (the least confident) are kept per batch however easy they are. The loss is
    the mean over the kept pixels. Selection stays on the device (no host sync).
    """

    mode = "multiclass"
    weight: torch.Tensor | None  # a buffer

    def __init__(self, ignore_index: int = 255, threshold: float = 0.7, min_kept: int = 100_000,
                 class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not 0.0 < threshold <= 1.0:
            raise ConfigError("loss.threshold", f"must be in (0, 1], got {threshold}")
        if min_kept < 0:
            raise ConfigError("loss.min_kept", f"must be >= 0, got {min_kept}")
        self.ignore_index = ignore_index
        self.threshold = threshold
        self.min_kept = min_kept
        self.register_buffer("weight", _weight_tensor(class_weights), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, 0)
        with torch.no_grad():
            true_prob = logits.softmax(1).gather(1, safe_target.unsqueeze(1))[:, 0]
            # Ignored pixels get probability 2: above every threshold, last in the ranking.
            ranked = torch.where(valid, true_prob, 2.0).flatten()
            threshold = logits.new_tensor(self.threshold)
            if self.min_kept > 0:
                kth = ranked.kthvalue(min(self.min_kept, ranked.numel())).values
                threshold = torch.maximum(threshold, kth)
            kept = valid & (true_prob <= threshold)
        losses = F.cross_entropy(logits, safe_target, weight=self.weight, reduction="none")
        pixel_weight = kept.to(losses.dtype)
        if self.weight is not None:
            pixel_weight = pixel_weight * self.weight[safe_target]
        return (losses * kept).sum() / pixel_weight.sum().clamp_min(1e-12)


def _weight_tensor(class_weights: Sequence[float] | None) -> torch.Tensor | None:
    if isinstance(class_weights, str):
        raise ConfigError("loss.class_weights", f"{class_weights!r} must be resolved before building the loss")
    return torch.tensor(list(class_weights), dtype=torch.float32) if class_weights is not None else None


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
