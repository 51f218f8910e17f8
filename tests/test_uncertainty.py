"""uncertainty_method: the variance of TTA views and of MC-dropout passes, by hand and through segkit.load."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
from torch import nn

import segkit
from segkit.errors import ConfigError
from segkit.inference.predictor import Ensemble
from segkit.inference.uncertainty import Moments, sampled_probs
from segkit.models.sliding import predict_probs

from .conftest import one_tensor
from .test_inference import make_checkpoint


class LeftQuarter(nn.Module):
    """Class 1 in the left quarter of whatever it is shown, class 0 elsewhere, with (near) certainty.

    Not flip-equivariant on purpose: the flipped view, flipped back, says class 1 in the right quarter,
    so the two views disagree completely in both outer quarters and agree in the middle half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        logits = torch.zeros(batch, 2, height, width)
        logits[:, 0] = 20.0
        logits[:, 1, :, : width // 4] = 40.0
        return logits


def test_tta_variance_is_the_largest_where_the_views_disagree_and_zero_elsewhere():
    images = torch.rand(2, 3, 8, 16)
    probs, variance = sampled_probs(LeftQuarter(), images, "tta_variance", tta_flip=True)
    # Two one-hot views that differ: each class has variance 1/4, the sum 1/2 = 1 - 1/C, the maximum.
    expected = torch.zeros(2, 8, 16)
    expected[..., :4] = expected[..., 12:] = 1.0
    torch.testing.assert_close(variance, expected, rtol=0, atol=1e-6)
    assert torch.equal(probs, predict_probs(LeftQuarter(), images, tta_flip=True))  # the mean is plain TTA's


def test_moments_equal_the_variance_of_the_stacked_samples():
    samples = torch.randn(5, 2, 4, 6, 7, generator=torch.Generator().manual_seed(0)).mul(3).softmax(2)
    moments = Moments()
    for sample in samples:
        moments.add(sample)
    torch.testing.assert_close(moments.mean(), samples.mean(0))
    reference = samples.var(0, unbiased=False).sum(1) / (1 - 1 / 4)
    torch.testing.assert_close(moments.variance(), reference)
    assert 0 < float(moments.variance().max()) <= 1


def test_tta_variance_through_the_training_geometry(compose_cfg, tmp_path):
    predictor = segkit.load(make_checkpoint(compose_cfg, tmp_path / "best.pt"), "cpu")  # trained at 32x32
    predictor.model = cast(Any, LeftQuarter())  # a stand-in for the Segmenter
    image = torch.rand(3, 16, 64)  # letterboxed to 8x32 at the top of the 32x32 box, then back to 16x64
    result = predictor.uncertainty(image, "tta_variance", tta={"scales": [1.0], "flip": True})
    assert result.variance is not None
    assert result.probs.shape == (1, 2, 16, 64) and result.variance.shape == (1, 16, 64)
    variance = result.variance[0]
    # The box's columns 0-7 and 24-31 disagree; resized x2 bilinearly, only the two seams are in between.
    assert torch.all(variance[:, :15] > 0.999) and torch.all(variance[:, 49:] > 0.999)
    assert torch.all(variance[:, 17:47] < 1e-6)
    assert set(result.maps()) == {"confidence", "entropy", "variance"}
    plain = predictor.probabilities(image[None], tta={"scales": [1.0], "flip": True})
    assert torch.equal(result.probs, plain)  # the prediction is plain TTA's


def test_mc_dropout_samples_the_dropout_and_leaves_batchnorm_alone(compose_cfg, tmp_path):
    predictor = segkit.load(make_checkpoint(compose_cfg, tmp_path / "fpn.pt"), "cpu")  # Dropout2d, BatchNorm
    model = predictor.model
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and any(isinstance(m, nn.Dropout2d) for m in model.modules())
    with torch.no_grad():  # non-trivial statistics, so a BatchNorm in train mode would change them
        for norm in norms:
            assert norm.running_mean is not None
            norm.running_mean.uniform_(-0.5, 0.5)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    norm_modes: list[bool] = []
    hooks = [norm.register_forward_hook(lambda m, i, o: norm_modes.append(m.training)) for norm in norms]
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    result = predictor.uncertainty(image, "mc_dropout", mc_samples=4)
    assert result.variance is not None
    for hook in hooks:
        hook.remove()
    assert norm_modes and not any(norm_modes)  # BatchNorm ran in eval mode in every pass
    assert float(result.variance.max()) > 1e-4  # the passes differ
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # running stats untouched
    assert not any(m.training for m in model.modules())  # dropout back in eval mode
    first = one_tensor(predictor.predict(image, return_logits=True))
    assert torch.equal(first, one_tensor(predictor.predict(image, return_logits=True)))  # deterministic again


def test_mc_dropout_without_dropout_is_one_line_naming_the_key(compose_cfg, tmp_path):
    predictor = segkit.load(make_checkpoint(compose_cfg, tmp_path / "unet.pt", ["model=unet"]), "cpu")  # no dropout
    with pytest.raises(ConfigError) as caught:
        predictor.uncertainty(torch.rand(3, 32, 32), "mc_dropout")
    message = str(caught.value)
    assert message.startswith("uncertainty_method: mc_dropout") and "\n" not in message
    assert "no dropout" in message and "zero variance" in message and "tta_variance" in message
    with pytest.raises(ConfigError, match="^uncertainty_method: tta_variance needs several TTA views"):
        predictor.uncertainty(torch.rand(3, 32, 32), "tta_variance")  # no TTA: one view
    with pytest.raises(ConfigError, match="^uncertainty_method: must be one of"):
        predictor.uncertainty(torch.rand(3, 32, 32), "dropout")


def test_an_ensemble_pools_the_variance_of_its_members(compose_cfg, tmp_path):
    first = make_checkpoint(compose_cfg, tmp_path / "a.pt")
    second = make_checkpoint(compose_cfg, tmp_path / "b.pt", ["trainer.seed=1"])
    images = torch.rand(1, 3, 24, 40)
    tta = {"scales": [0.75, 1.0], "flip": True}
    alone = segkit.load(first, "cpu").uncertainty(images, "tta_variance", tta=tta)
    twice = Ensemble.load([first, first], "cpu").uncertainty(images, "tta_variance", tta=tta)
    torch.testing.assert_close(twice.variance, alone.variance)  # the same member twice: nothing between
    both = Ensemble.load([first, second], "cpu").uncertainty(images, "tta_variance", tta=tta)
    other = segkit.load(second, "cpu").uncertainty(images, "tta_variance", tta=tta)
    assert alone.variance is not None and other.variance is not None and both.variance is not None
    within = (alone.variance + other.variance) / 2
    assert torch.all(both.variance >= within - 1e-6) and float((both.variance - within).max()) > 0
