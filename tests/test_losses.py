"""Each loss against a hand computation on a tiny case, and ignore_index pixels contributing nothing."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from segkit.config import build
from segkit.errors import ConfigError
from segkit.losses import BinaryCrossEntropy, GeneralizedDice, OhemCrossEntropy, WeightedSum

from .conftest import CONF_DIR, TINY

IGNORE = 255
# float32 softmax/log on a handful of values: results agree with float64 hand arithmetic to ~1e-6.
TOL = 1e-5


def two_class_logits(p_class1: list[float]) -> torch.Tensor:
    """(1, 2, 1, N) logits whose softmax gives class 1 the probabilities `p_class1`."""
    p = torch.tensor(p_class1, dtype=torch.float64)
    return torch.stack([torch.log(1 - p), torch.log(p)]).view(1, 2, 1, -1).float()


def test_generalized_dice_by_hand():
    # 4 pixels; p(class 1) = .9 .8 .3 .1; targets 1 1 0 0 ... plus one ignored pixel (p = .5, target 255).
    logits = two_class_logits([0.9, 0.8, 0.3, 0.1, 0.5])
    target = torch.tensor([[[1, 1, 0, 0, IGNORE]]])
    # class 0: sum g = 2, w = 1/4, sum p*g = .7 + .9 = 1.6, sum p + sum g = (.1+.2+.7+.9) + 2 = 3.9
    # class 1: sum g = 2, w = 1/4, sum p*g = .9 + .8 = 1.7, sum p + sum g = (.9+.8+.3+.1) + 2 = 4.1
    expected = 1 - 2 * (0.25 * 1.6 + 0.25 * 1.7) / (0.25 * 3.9 + 0.25 * 4.1)
    assert float(GeneralizedDice(ignore_index=IGNORE)(logits, target)) == pytest.approx(expected, abs=TOL)


def test_generalized_dice_weighs_rare_classes_by_inverse_squared_count():
    # class 1 has one target pixel (w = 1), class 0 three (w = 1/9).
    logits = two_class_logits([0.2, 0.2, 0.2, 0.6])
    target = torch.tensor([[[0, 0, 0, 1]]])
    w0, w1 = 1 / 9, 1.0
    inter = w0 * (0.8 * 3) + w1 * 0.6
    denom = w0 * ((0.8 * 3 + 0.4) + 3) + w1 * ((0.2 * 3 + 0.6) + 1)
    assert float(GeneralizedDice()(logits, target)) == pytest.approx(1 - 2 * inter / denom, abs=TOL)


def test_generalized_dice_gives_an_absent_class_the_largest_finite_weight():
    logits = two_class_logits([0.3, 0.4])
    target = torch.tensor([[[0, 0]]])  # class 1 absent: weight 1/inf -> that of class 0, 1/4
    inter = 0.25 * (0.7 + 0.6)
    denom = 0.25 * ((0.7 + 0.6) + 2) + 0.25 * (0.3 + 0.4)
    assert float(GeneralizedDice()(logits, target)) == pytest.approx(1 - 2 * inter / denom, abs=TOL)


def test_ohem_keeps_only_pixels_below_the_threshold():
    # True-class probabilities .95 .9 .6 .2 (targets 1 1 1 0 with p(class 1) = .95 .9 .6 .8): two are hard.
    logits = two_class_logits([0.95, 0.9, 0.6, 0.8, 0.1])
    target = torch.tensor([[[1, 1, 1, 0, IGNORE]]])  # the ignored pixel (true prob .9 or .1) is never kept
    loss = OhemCrossEntropy(ignore_index=IGNORE, threshold=0.7, min_kept=1)(logits, target)
    assert float(loss) == pytest.approx((-math.log(0.6) - math.log(0.2)) / 2, abs=TOL)


def test_ohem_keeps_at_least_min_kept_hardest_pixels():
    logits = two_class_logits([0.95, 0.9, 0.6, 0.8])
    target = torch.tensor([[[1, 1, 1, 0]]])
    loss = OhemCrossEntropy(threshold=0.1, min_kept=3)(logits, target)  # none below .1: the 3 hardest
    assert float(loss) == pytest.approx((-math.log(0.9) - math.log(0.6) - math.log(0.2)) / 3, abs=TOL)
    everything = OhemCrossEntropy(threshold=0.1, min_kept=100)(logits, target)  # more than there are: all
    assert float(everything) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target)), abs=TOL)


def test_binary_cross_entropy_averages_over_valid_pixels_only():
    logit = torch.tensor([2.0, -1.0, 0.5, 7.0]).view(1, 1, 1, 4)
    target = torch.tensor([[[1, 0, 0, IGNORE]]])
    sigmoid = [1 / (1 + math.exp(-z)) for z in (2.0, -1.0, 0.5)]
    expected = -(math.log(sigmoid[0]) + math.log(1 - sigmoid[1]) + math.log(1 - sigmoid[2])) / 3
    assert float(BinaryCrossEntropy(ignore_index=IGNORE)(logit, target)) == pytest.approx(expected, abs=TOL)


def compose_loss(name: str, classes: int):
    overrides = [*TINY, f"loss={name}", f"dataset.num_classes={classes}", "dataset.class_names=null"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return build(cfg.loss, "loss")


def test_jaccard_config_by_hand():
    loss = compose_loss("jaccard", 2)
    logits = two_class_logits([0.9, 0.8, 0.3, 0.1, 0.5])
    target = torch.tensor([[[1, 1, 0, 0, IGNORE]]])
    # soft IoU_c = sum p g / (sum p + sum g - sum p g), over the 4 valid pixels
    iou0 = 1.6 / (1.9 + 2 - 1.6)
    iou1 = 1.7 / (2.1 + 2 - 1.7)
    assert float(loss(logits, target)) == pytest.approx(1 - (iou0 + iou1) / 2, abs=TOL)


MULTICLASS = ["ce", "ce_dice", "ce_dice_lovasz", "dice", "focal", "lovasz", "tversky", "jaccard", "generalized_dice",
              "ohem"]


@pytest.mark.parametrize(("name", "channels"), [*((n, 3) for n in MULTICLASS), ("dice_bce", 1)])
def test_ignored_pixels_contribute_nothing(name, channels):
    """Whatever the logits and the target value at ignored pixels, the loss is the same and no
    gradient reaches them."""
    loss_fn = compose_loss(name, 2 if channels == 1 else channels)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, channels, 6, 6, generator=gen)
    target = torch.randint(0, max(channels, 2), (2, 6, 6), generator=gen)
    ignored = torch.zeros(2, 6, 6, dtype=torch.bool)
    ignored[:, :2] = True
    target[ignored] = IGNORE
    logits.requires_grad_(True)
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None
    assert float(logits.grad.abs().sum(1)[ignored].max()) == 0.0
    assert float(logits.grad.abs().sum()) > 0  # the valid pixels do get a gradient

    changed = logits.detach().clone()
    changed[:, :, :2] = torch.randn(2, channels, 2, 6, generator=gen) * 10
    assert float(loss_fn(changed, target)) == pytest.approx(float(loss.detach()), abs=TOL)


class CountingLoss(torch.nn.Module):
    """A loss term that says how often it was computed."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.calls = value, 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return logits.sum() * 0 + self.value


def test_a_term_counts_from_its_epoch_on_and_is_not_computed_before():
    late = CountingLoss(5.0)
    loss = WeightedSum({"early": CountingLoss(1.0), "late": late}, weights={"late": 0.5}, from_epoch={"late": 2})
    logits, target = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    for epoch, expected in [(0, 1.0), (1, 1.0), (2, 3.5), (3, 3.5)]:
        loss.set_epoch(epoch)
        assert float(loss(logits, target)) == expected, epoch
    assert late.calls == 2  # epochs 2 and 3 only


@pytest.mark.parametrize(
    ("from_epoch", "message"),
    [({"lovasz": 1}, "not loss terms"), ({"a": 1, "b": 2}, "from epoch 0"), ({"a": -1}, "count from 0")],
)
def test_from_epoch_mistakes_name_the_key(from_epoch, message):
    with pytest.raises(ConfigError, match=f"loss.from_epoch.*{message}"):
        WeightedSum({"a": CountingLoss(1.0), "b": CountingLoss(2.0)}, from_epoch=from_epoch)
