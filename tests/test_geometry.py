"""One inference geometry: validation, evaluate, predict, `segkit.load(...).predict` and ONNX agree on
original-size images, and scores are computed at the native resolution against the untouched masks."""

from __future__ import annotations

import json
from typing import Any, cast

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

import segkit
from segkit.cli import evaluate as evaluate_cli
from segkit.cli import predict as predict_cli
from segkit.config import validate_config
from segkit.data.geometry import TrainingGeometry, fitted_size, letterbox, letterbox_images, restore_logits
from segkit.data.loading import build_dataset, build_loader
from segkit.engine.trainer import fit
from segkit.errors import ConfigError
from segkit.inference.evaluation import evaluate
from segkit.inference.predictor import Predictor
from segkit.runs.checkpoint import load_checkpoint

from .conftest import CONF_DIR, TINY, one_tensor, paired


def compose_config(name, overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def write_pairs(root, split, sizes, image_dir="images/{split}", mask_dir="masks/{split}"):
    """One image/mask pair per size: stripes of classes 0-2 (a few pixels wide) on noise."""
    rng = np.random.default_rng(len(sizes))
    images, masks = root / image_dir.format(split=split), root / mask_dir.format(split=split)
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i, (height, width) in enumerate(sizes):
        mask = ((np.arange(width)[None, :] // 5 + np.arange(height)[:, None] // 7) % 3).astype(np.uint8)
        image = (rng.integers(0, 60, (height, width, 3)) + 90 * mask[..., None]).astype(np.uint8)
        Image.fromarray(image).save(images / f"img_{i:02d}.png")
        Image.fromarray(mask).save(masks / f"img_{i:02d}.png")
    return root


# ------------------------------------------------------------------ the geometry itself
def test_restore_logits_undoes_the_letterbox_of_a_smooth_field():
    """A linear ramp letterboxed into a smaller box and restored comes back to within interpolation error."""
    height, width, box = 40, 60, (16, 32)
    ramp = torch.linspace(0, 1, width).expand(height, width)
    field = torch.stack([ramp, 1 - ramp])[None]  # (1, 2, H, W) scores
    boxed = letterbox_images(field, box)
    new_h, new_w = fitted_size((height, width), box)
    assert (new_h, new_w) == (16, 24) and boxed.shape[-2:] == box
    assert boxed[..., new_w:].abs().max() == 0  # padding right of the image
    restored = restore_logits(boxed, (height, width))
    assert restored.shape == (1, 2, height, width)
    # Linear ramp resampled twice: the error is at most one box pixel's step (1/23) at the clamped edges.
    assert (restored - field).abs().max() < 1.0 / (new_w - 1)


def test_geometry_from_the_config_decides_the_mode():
    whole = TrainingGeometry.from_config({"dataset": {"image_size": [96, 128]}, "augmentation": {"crop_size": None}})
    assert whole.mode == "whole" and whole.window is None
    same = TrainingGeometry.from_config({"dataset": {"image_size": [96, 128]},
                                         "augmentation": {"crop_size": [96, 128]}})
    assert same.mode == "whole"
    crops = TrainingGeometry.from_config({"dataset": {"image_size": [360, 480]},
                                          "augmentation": {"crop_size": [352, 480]}})
    assert crops.mode == "slide" and crops.window == (352, 480)
    assert TrainingGeometry.from_dict(crops.as_dict()) == crops
    # trainer.inference_mode=whole: the same crops, run on the whole box; recorded, and read back
    whole_box = TrainingGeometry.from_config({"dataset": {"image_size": [360, 480]},
                                              "augmentation": {"crop_size": [352, 480]},
                                              "trainer": {"inference_mode": "whole"}})
    assert whole_box.mode == "whole" and whole_box.window == (352, 480)
    assert TrainingGeometry.from_dict(whole_box.as_dict()) == whole_box
    # a geometry written before the key existed ran crop-trained models in windows
    assert TrainingGeometry.from_dict({"image_size": [360, 480], "crop_size": [352, 480]}).mode == "slide"
    with pytest.raises(ValueError, match="inference must be one of auto, whole, slide"):
        TrainingGeometry.from_dict({"image_size": [360, 480], "crop_size": None, "inference": "tiles"})


def test_inference_mode_slide_needs_a_crop_smaller_than_the_box():
    cfg = compose_config("train", [*TINY, "trainer.inference_mode=slide"])
    with pytest.raises(ConfigError, match=r"^trainer.inference_mode: slide runs windows of augmentation.crop_size"):
        validate_config(cfg)
    cfg = compose_config("train", [*TINY, "trainer.inference_mode=tiles"])
    with pytest.raises(ConfigError, match=r"^trainer.inference_mode: must be one of auto, whole, slide"):
        validate_config(cfg)
    validate_config(compose_config("train", [*TINY, "trainer.inference_mode=slide", "augmentation.crop_size=[16,16]"]))


# ------------------------------------------------------------------ scoring protocol, by hand
class FixedScores(nn.Module):
    """Returns the same scores for every image: one-hot of a given (h, w) label map."""

    scores: torch.Tensor

    def __init__(self, labels: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.register_buffer("scores", nn.functional.one_hot(labels, classes).permute(2, 0, 1).float()[None])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(images.shape[0], -1, -1, -1)


def predictor_for(model: nn.Module, image_size, classes=2, crop_size=None) -> Predictor:
    cfg = OmegaConf.create({
        "dataset": {"num_classes": classes, "image_size": list(image_size), "ignore_index": 255,
                    "class_names": [f"c{i}" for i in range(classes)]},
        "augmentation": {"crop_size": list(crop_size) if crop_size else None},
    })
    return Predictor(cast(Any, model), cfg, torch.device("cpu"))  # any module in place of a Segmenter


def test_one_pixel_lines_score_differently_at_native_and_input_resolution(tmp_path):
    """8x8 mask with one-pixel lines of class 1 in columns 1 and 5, letterboxed to 4x4.

    Nearest downsampling keeps columns 1, 3, 5, 7, so at 4x4 the lines are box columns 0 and 2; a model
    predicting exactly that is perfect at the input size. Restored bilinearly to 8x8 (half-pixel
    centres), class 1's score per column is [1, .75, .25, .25, .75, .75, .25, 0]: columns 0, 1, 4, 5
    are predicted class 1. Per row: class 1 TP 2, FP 2 -> IoU 2/4; class 0 TP 4, FN 2 -> IoU 4/6;
    mIoU (1/2 + 2/3) / 2 = 7/12, pixel accuracy 6/8.
    """
    mask = np.zeros((8, 8), np.uint8)
    mask[:, [1, 5]] = 1
    root = tmp_path / "data"
    for sub, array in (("images/val", np.stack([mask * 255] * 3, -1)), ("masks/val", mask)):
        (root / sub).mkdir(parents=True)
        Image.fromarray(array.astype(np.uint8)).save(root / sub / "lines.png")
    dataset = build_dataset(OmegaConf.create({
        "_target_": "segkit.data.readers.folder.FolderDataset", "root": str(root), "num_classes": 2,
        "ignore_index": 255, "image_size": [4, 4], "name": "lines"}), "val")
    boxed_mask = dataset[0][1]
    assert boxed_mask.tolist() == [[1, 0, 1, 0]] * 4
    predictor = predictor_for(FixedScores(boxed_mask, 2), (4, 4))
    loader = build_loader(dataset, batch_size=1, num_workers=0, train=False, seed=0, pin_memory=False)

    at_input = evaluate(predictor, dataset, loader, score_at="input", progress_bar=False).summary
    assert at_input["miou"] == 1.0 and at_input["pixel_acc"] == 1.0

    native = evaluate(predictor, dataset, loader, score_at="native", progress_bar=False)
    assert native.summary["per_class_iou"] == {"class_0": pytest.approx(4 / 6), "class_1": pytest.approx(2 / 4)}
    assert native.summary["miou"] == pytest.approx(7 / 12) and native.summary["pixel_acc"] == pytest.approx(6 / 8)
    assert native.records[0]["miou"] == pytest.approx(7 / 12)
    assert set(native.records[0]) == {"filename", "predicted_mask_path", "pixel_accuracy", "per_class_iou", "miou"}


# ------------------------------------------------------------------ slide and TTA where they must agree
class Pointwise(nn.Module):
    """A 1x1 convolution: every pixel is independent, so windows and flips change nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_crop_trained_models_slide_at_the_training_scale_and_agree_with_whole_where_they_must():
    predictor = predictor_for(Pointwise(), (48, 64), classes=3, crop_size=(32, 32))
    assert predictor.geometry.mode == "slide"
    image = torch.rand(1, 3, 120, 160)  # 2.5x the training scale
    whole = predictor.logits(image, mode="whole")
    auto = predictor.logits(image)  # slides 32x32 windows over the 48x64 letterboxed image
    flipped = predictor.logits(image, tta={"scales": [1.0], "flip": True})
    # Same float32 products per pixel, summed in another order across overlapping windows: a few ulps.
    torch.testing.assert_close(auto, whole, rtol=1e-5, atol=1e-5)
    # TTA returns log of averaged probabilities: equal scores up to a per-pixel constant.
    torch.testing.assert_close(flipped.softmax(1), whole.softmax(1), rtol=1e-5, atol=1e-5)
    # The letterbox at the training scale is what the model saw; the raw image is not.
    boxed = letterbox_images(image, (48, 64))
    expected = restore_logits(Pointwise()(boxed), (120, 160))
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ every path, one model trained at a reduced size
@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    """A few steps on 60x80 / 45x90 images letterboxed to 32x32 (mixed sizes in one split)."""
    base = tmp_path_factory.mktemp("geometry")
    root, cfg = train_reduced(base)
    return base, root, cfg


def train_reduced(base, *overrides):
    """Three steps on mixed-size pairs letterboxed to 32x32, into base / "run"; returns the data root and config."""
    sizes = [(60, 80), (45, 90), (60, 80), (72, 48)]
    root = write_pairs(base / "data", "train", sizes)
    write_pairs(root, "val", sizes)
    cfg = compose_config("train", [
        *(o for o in TINY if not o.startswith("dataset.")), "dataset=folder", f"dataset.root={root}",
        "dataset.num_classes=3", "dataset.image_size=[32,32]", "trainer.max_steps=3", "trainer.batch_size=2",
        "optimizer.lr=0.05", *overrides,
    ])
    fit(cfg, base / "run")
    return root, cfg


def predicted_by_hand(predictor, root):
    """The val files, their original images, and the whole-box prediction of each (not a constant map)."""
    files = sorted((root / "images" / "val").iterdir())
    originals = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1) for f in files]
    expected = [by_hand(predictor, image) for image in originals]
    assert any(len(e.unique()) > 1 for e in expected)  # not a constant map: agreement below means something
    return files, originals, expected


def by_hand(predictor, image: torch.Tensor) -> torch.Tensor:
    """The geometry spelled out: letterbox to 32x32, whole image, restore, argmax."""
    height, width = image.shape[-2:]
    boxed, _ = letterbox(image, torch.zeros(height, width, dtype=torch.long), (32, 32), 255)
    with torch.no_grad():
        scores = predictor.model(boxed[None].float() / 255)
    return restore_logits(scores, (height, width))[0].argmax(0)


def agreement(a, b) -> float:
    a, b = (x.numpy() if isinstance(x, torch.Tensor) else np.array(x) for x in (a, b))
    return float((a == b).mean())


def test_every_path_predicts_what_training_saw(reduced_run, tmp_path):
    base, root, _ = reduced_run
    checkpoint = base / "run" / "checkpoints" / "last.pt"
    assert load_checkpoint(checkpoint)["geometry"] == {"image_size": [32, 32], "crop_size": [32, 32],
                                                       "inference": "auto"}
    predictor = segkit.load(checkpoint, device="cpu")
    files, originals, expected = predicted_by_hand(predictor, root)

    # segkit.load(...).predict on the original image
    for image, reference in zip(originals, expected, strict=True):
        prediction = one_tensor(predictor.predict(image))
        assert prediction.shape == image.shape[-2:] and agreement(prediction, reference) >= 0.99

    # segkit-predict on the original files
    out = tmp_path / "predicted"
    cfg = compose_config("predict", [f"checkpoint={checkpoint}", f"input={root / 'images' / 'val'}",
                                     f"output={out}", "progress_bar=false"])
    assert predict_cli.run(cfg) == 0
    for path, reference in zip(files, expected, strict=True):
        assert agreement(Image.open(out / f"{path.stem}.png"), reference) >= 0.99

    # segkit-evaluate: masks at the original size, scored against the original masks
    cfg = compose_config("evaluate", [f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'eval'}",
                                      "progress_bar=false", "report=false"])
    metrics = evaluate_cli.run(cfg)
    assert metrics["scored_at"] == "native"
    confusion = torch.zeros(3, 3, dtype=torch.long)
    for path, reference in zip(files, expected, strict=True):
        assert agreement(Image.open(tmp_path / "eval" / "per_image" / f"{path.stem}_pred.png"), reference) >= 0.99
        target = torch.from_numpy(np.array(Image.open(root / "masks" / "val" / path.name))).long()
        confusion += torch.bincount(target.flatten() * 3 + reference.flatten(), minlength=9).view(3, 3)
    assert metrics["confusion_matrix"] == confusion.tolist()  # every original pixel, none of the padding

    # onnxruntime on the original image, through the geometry stored in the exported file
    pytest.importorskip("onnxruntime")
    from segkit.inference.export import export_onnx, onnx_logits, onnx_session

    path = export_onnx(predictor.model, tmp_path / "model.onnx", (48, 48), geometry=predictor.geometry)
    session = onnx_session(path, threads=1)
    for image, reference in zip(originals, expected, strict=True):
        assert agreement(onnx_logits(session, image[None])[0].argmax(0), reference) >= 0.99


def test_a_crop_trained_model_runs_whole_on_every_path_when_training_says_so(tmp_path):
    """trainer.inference_mode=whole: validation, evaluate (mode=auto), segkit.load and ONNX all run the model
    trained on 16x16 crops on the whole 32x32 letterbox, and scoring it in windows gives other figures."""
    root, _ = train_reduced(tmp_path, "augmentation.crop_size=[16,16]", "trainer.inference_mode=whole")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    assert load_checkpoint(checkpoint)["geometry"] == {"image_size": [32, 32], "crop_size": [16, 16],
                                                       "inference": "whole"}
    predictor = segkit.load(checkpoint, device="cpu")
    _, originals, expected = predicted_by_hand(predictor, root)  # the whole 32x32 box, no windows
    for image, reference in zip(originals, expected, strict=True):
        assert agreement(one_tensor(predictor.predict(image)), reference) >= 0.99

    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    evaluated = {mode: evaluate_cli.run(compose_config("evaluate", [
        f"checkpoint={checkpoint}", f"output_dir={tmp_path / mode}", "progress_bar=false", "report=false",
        f"mode={mode}"])) for mode in ("auto", "slide")}
    assert evaluated["auto"]["miou"] == summary["final"]["miou"]  # validation ran it whole, as evaluate does
    assert evaluated["auto"]["per_class_iou"] == summary["final"]["per_class_iou"]
    assert evaluated["auto"]["geometry"]["inference"] == "whole"
    assert evaluated["slide"]["confusion_matrix"] != evaluated["auto"]["confusion_matrix"]

    pytest.importorskip("onnxruntime")
    from segkit.inference.export import export_onnx, onnx_logits, onnx_session

    path = export_onnx(predictor.model, tmp_path / "model.onnx", (48, 48), geometry=predictor.geometry)
    session = onnx_session(path, threads=1)
    for image, reference in zip(originals, expected, strict=True):
        assert agreement(onnx_logits(session, image[None])[0].argmax(0), reference) >= 0.99


def test_validation_scores_mixed_sizes_at_the_native_resolution_like_evaluate(reduced_run, tmp_path):
    """Validation during training (DataLoader and device cache) and evaluate give the same native figures."""
    base, _, cfg = reduced_run
    summary = json.loads((base / "run" / "metrics.json").read_text())
    assert summary["scored_at"] == "native"
    assert "val/scored_at" in (base / "run" / "epochs.csv").read_text().splitlines()[0]
    eval_cfg = compose_config("evaluate", [f"checkpoint={base / 'run' / 'checkpoints' / 'last.pt'}",
                                           f"output_dir={tmp_path / 'eval'}", "progress_bar=false", "report=false"])
    metrics = evaluate_cli.run(eval_cfg)
    assert metrics["miou"] == summary["final"]["miou"]
    assert metrics["per_class_iou"] == summary["final"]["per_class_iou"]

    cached = cfg.copy()
    cached.dataset.cache = "device"
    fit(cached, tmp_path / "cached")
    assert json.loads((tmp_path / "cached" / "metrics.json").read_text())["final"] == summary["final"]

    at_input = cfg.copy()
    at_input.trainer.score_at = "input"
    fit(at_input, tmp_path / "input")
    input_summary = json.loads((tmp_path / "input" / "metrics.json").read_text())
    assert input_summary["scored_at"] == "input" and input_summary["final"]["miou"] != summary["final"]["miou"]


def test_camvid_test_split_reads_test_and_testannot(tmp_path):
    """The CamVid layout's test split (test/ + testannot/, void 11 -> ignore), on a generated fixture."""
    root = tmp_path / "camvid"
    for split in ("train", "val", "test"):
        write_pairs(root, split, [(36, 48)] * (2 if split != "test" else 3), image_dir="{split}",
                    mask_dir="{split}annot")
    void = np.full((36, 48), 11, np.uint8)
    Image.fromarray(void).save(root / "testannot" / "img_02.png")
    dataset = paired(build_dataset(compose_config("train", ["dataset=camvid", f"dataset.root={root}"]).dataset, "test"))
    assert len(dataset) == 3 and dataset.pairs[0][0].parent.name == "test"
    assert dataset.pairs[0][1].parent.name == "testannot"
    assert set(dataset.native_mask(2).unique().tolist()) == {255}
    assert dataset.native_mask(0).shape == (36, 48)
