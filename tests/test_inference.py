"""Inference: sliding window, TTA, post-processing, `segkit.load` and the predict command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

import segkit
from segkit.cli import predict as predict_cli
from segkit.config import build
from segkit.data.geometry import letterbox, unletterbox
from segkit.errors import CheckpointError, ConfigError
from segkit.models.sliding import (
    clean_mask,
    predict_logits,
    predict_probs,
    slide_logits,
    window_starts,
)
from segkit.runs.checkpoint import save_checkpoint

from .conftest import CONF_DIR, one_tensor


class Pointwise(nn.Module):
    """A 1x1 convolution: every pixel is independent, so it commutes with flips and crops."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def make_checkpoint(compose_cfg, path, overrides=()):
    """An untrained model saved as the trainer saves it: enough to test loading and inference."""
    cfg = compose_cfg(["model=fpn", *overrides])
    stored = OmegaConf.to_yaml(cfg, resolve=True)
    cfg.backbone.pretrained = False  # building here must not download either
    model = build(cfg.model, "model")
    save_checkpoint({"model": model.state_dict(), "config": stored}, path)
    return path


def test_window_starts_cover_the_edges():
    assert window_starts(10, 16, 8) == [0]
    assert window_starts(100, 32, 20) == [0, 20, 40, 60, 68]
    for length, crop, stride in [(97, 32, 21), (64, 32, 32), (33, 32, 5)]:
        covered = np.zeros(length, bool)
        for start in window_starts(length, crop, stride):
            covered[start : start + crop] = True
        assert covered.all()


def test_slide_equals_whole_when_the_window_covers_the_image(compose_cfg):
    model = build(compose_cfg(["model=fpn"]).model, "model").eval()
    images = torch.rand(2, 3, 40, 56)
    whole = predict_logits(model, images, mode="whole")
    for crop in ([40, 56], [64, 64]):
        torch.testing.assert_close(predict_logits(model, images, "slide", crop, [8, 8]), whole)


def test_slide_averages_overlapping_windows_exactly_for_a_pointwise_model():
    model = Pointwise().eval()
    images = torch.rand(2, 3, 50, 70)
    slid = slide_logits(model, images, crop_size=(16, 24), stride=(10, 9), windows_per_batch=3)
    torch.testing.assert_close(slid, model(images), rtol=1e-5, atol=1e-5)


def test_auto_mode_slides_only_above_the_crop_size():
    calls = []

    class Recorder(Pointwise):
        def forward(self, x):
            calls.append(tuple(x.shape[-2:]))
            return super().forward(x)

    model = Recorder().eval()
    predict_logits(model, torch.rand(1, 3, 20, 20), mode="auto", crop_size=(32, 32))
    assert calls == [(20, 20)]
    calls.clear()
    predict_logits(model, torch.rand(1, 3, 40, 20), mode="auto", crop_size=(32, 32))
    assert calls and set(calls) == {(32, 20)}


def test_flip_tta_on_a_flip_equivariant_model_equals_plain():
    model = Pointwise().eval()
    images = torch.rand(2, 3, 24, 30)
    plain = model(images).softmax(1)
    torch.testing.assert_close(predict_probs(model, images, tta_flip=True), plain)
    tta_logits = predict_logits(model, images, tta_flip=True)
    torch.testing.assert_close(tta_logits.softmax(1), plain)
    assert torch.equal(tta_logits.argmax(1), plain.argmax(1))


def test_multi_scale_tta_returns_probabilities_at_the_input_size():
    images = torch.rand(1, 3, 21, 33)
    probs = predict_probs(Pointwise().eval(), images, tta_scales=(0.75, 1.0, 1.25), tta_flip=True)
    assert probs.shape == (1, 3, 21, 33)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 21, 33))


def test_clean_mask_removes_islands_and_fills_holes():
    mask = np.zeros((20, 20), np.int64)
    mask[2:4, 2:4] = 1  # a 4-pixel island of class 1 in class 0
    mask[8:18, 8:18] = 2
    mask[12, 12] = 0  # a 1-pixel hole inside class 2
    cleaned = clean_mask(mask, min_region=5, max_hole=2)
    assert (cleaned[2:4, 2:4] == 0).all()
    assert cleaned[12, 12] == 2
    assert (cleaned[8:18, 8:18] == 2).all() and cleaned.sum() == 2 * 100
    as_tensor = clean_mask(torch.from_numpy(mask), min_region=5)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor[2, 2] == 0


def test_unletterbox_undoes_the_letterbox():
    mask = torch.randint(0, 3, (40, 48))
    image = torch.zeros(3, 40, 48, dtype=torch.uint8)
    _, boxed = letterbox(image, mask, (32, 32), 255)
    restored = unletterbox(boxed, (40, 48), (32, 32))
    assert restored.shape == (40, 48)
    assert (restored == mask).float().mean() > 0.6  # nearest down- and up-sampling loses detail only


def test_load_predicts_every_input_type(compose_cfg, tmp_path):
    # A checkpoint whose config asks for ImageNet weights: loading must not try to download them.
    path = make_checkpoint(compose_cfg, tmp_path / "best.pt", ["backbone.pretrained=true"])
    predictor = segkit.load(path, device="cpu")
    assert predictor.num_classes == 4
    assert predictor.class_names == ["background", "disc", "square", "triangle"]
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)
    chw = torch.from_numpy(array).permute(2, 0, 1)
    expected = one_tensor(predictor.predict(chw))
    assert expected.shape == (30, 44) and expected.dtype == torch.int64
    assert torch.equal(one_tensor(predictor.predict(array)), expected)
    assert torch.equal(one_tensor(predictor.predict(Image.fromarray(array))), expected)
    assert torch.equal(one_tensor(predictor.predict(chw.float() / 255)), expected)
    assert one_tensor(predictor.predict(chw[None].repeat(2, 1, 1, 1))).shape == (2, 30, 44)
    assert one_tensor(predictor.predict(chw, return_logits=True)).shape == (4, 30, 44)
    both = predictor.predict([array, np.zeros((50, 20, 3), np.uint8)], tta=True)
    assert [tuple(m.shape) for m in both] == [(30, 44), (50, 20)]
    large = one_tensor(predictor.predict(torch.rand(3, 150, 130), mode="auto"))  # above the 32x32 training size: slides
    assert large.shape == (150, 130)


def test_load_reports_a_wrong_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        segkit.load(bad)


def predict_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="predict", overrides=["progress_bar=false", *overrides])


def test_predict_writes_masks_and_skips_unreadable_files(compose_cfg, tmp_path, capsys):
    first = make_checkpoint(compose_cfg, tmp_path / "a.pt")
    second = make_checkpoint(compose_cfg, tmp_path / "b.pt", ["trainer.seed=1"])
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"small": (24, 30), "same": (24, 30), "large": (40, 60)}
    for name, size in sizes.items():
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(inputs / f"{name}.png")
    (inputs / "notes.png").write_text("this is not an image")
    Image.fromarray(np.zeros((200, 200), np.uint8)).save(inputs / "bomb.png")  # over max_pixels below
    out = tmp_path / "out"
    cfg = predict_cfg([
        f"checkpoint=[{first},{second}]", f"input={inputs}", f"output={out}", "overlay=true",
        "probabilities=true", "tta=true", "tta_scales=[1.0]", "max_pixels=20000", "batch_size=3",
        "min_region=3",
    ])
    pillow_limit = Image.MAX_IMAGE_PIXELS
    failed = predict_cli.run(cfg)
    assert failed == 2
    err = capsys.readouterr().err.splitlines()
    assert sum("skipped:" in line for line in err) == 2
    assert any("notes.png" in line for line in err)
    assert any("bomb.png" in line and "max_pixels" in line for line in err)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # the process-wide limit is left as it was
    for name, size in sizes.items():
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "L" and mask.size == (size[1], size[0])
        assert np.asarray(mask).max() < 4
        assert Image.open(out / "overlay" / f"{name}.png").size == (size[1], size[0])
        probs = np.load(out / "probs" / f"{name}.npy")
        assert probs.shape == (4, *size)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)


def test_predict_writes_variance_maps_of_mc_dropout(compose_cfg, tmp_path):
    checkpoint = make_checkpoint(compose_cfg, tmp_path / "fpn.pt")  # an fpn: Dropout2d in its decoder
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(inputs / "a.png")
    out = tmp_path / "out"
    torch.manual_seed(0)  # the dropout masks
    predict_cli.run(predict_cfg([f"checkpoint={checkpoint}", f"input={inputs}", f"output={out}", "uncertainty=true",
                                 "uncertainty_method=mc_dropout", "mc_samples=3"]))
    for name in ("confidence", "entropy", "variance"):
        with Image.open(out / name / "a.png") as picture:
            assert picture.mode == "L" and picture.size == (40, 24)  # 8-bit, at the input's size
    assert np.asarray(Image.open(out / "variance" / "a.png")).max() > 0  # the passes differ somewhere
    unet = make_checkpoint(compose_cfg, tmp_path / "unet.pt", ["model=unet"])  # no dropout layer
    with pytest.raises(ConfigError, match="^uncertainty_method: mc_dropout needs dropout"):
        predict_cli.run(predict_cfg([f"checkpoint={unet}", f"input={inputs}", f"output={tmp_path / 'no'}",
                                     "uncertainty_method=mc_dropout"]))
    assert not (tmp_path / "no" / "a.png").exists()
    plain = tmp_path / "plain"
    predict_cli.run(predict_cfg([f"checkpoint={checkpoint}", f"input={inputs}", f"output={plain}",
                                 "uncertainty=true"]))
    assert not (plain / "variance").exists()  # softmax: confidence and entropy only
