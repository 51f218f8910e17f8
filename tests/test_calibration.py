"""Confidence/entropy, ECE and its reliability bins, temperature scaling fitted, stored and applied."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torchmetrics.classification import MulticlassCalibrationError

import segkit
from segkit.cli import evaluate as evaluate_cli
from segkit.cli import export as export_cli
from segkit.engine.trainer import fit
from segkit.errors import CheckpointError, ConfigError
from segkit.inference.calibration import ReliabilityBins, confidence_and_entropy, fit_temperature
from segkit.runs.checkpoint import load_checkpoint, save_checkpoint

from .conftest import CONF_DIR, ROOT, TINY, one_tensor, write_folder_dataset

IGNORE = 255


def test_confidence_and_entropy_at_the_extremes():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]).T.reshape(1, 4, 1, 2)
    confidence, entropy = confidence_and_entropy(probs)
    assert confidence.flatten().tolist() == pytest.approx([0.25, 1.0])
    assert entropy.flatten().tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_ece_by_hand_and_as_torchmetrics():
    # 4 valid pixels in 2 bins of 10: confidences .95 .92 (one right) and .55 .6 (both right), one ignored.
    probs = torch.tensor([[0.95, 0.05], [0.08, 0.92], [0.55, 0.45], [0.4, 0.6], [0.9, 0.1]]).T.reshape(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 0, 1, IGNORE]]])
    bins = ReliabilityBins(10)
    bins.update(probs, target, IGNORE)
    result = bins.compute()
    # bin [.9, 1): accuracy 1/2, confidence .935; bin [.5, .6) holds .55, bin [.6, .7) holds .6: each accuracy 1
    expected = (2 * abs(0.5 - 0.935) + abs(1 - 0.55) + abs(1 - 0.6)) / 4
    assert result["ece"] == pytest.approx(expected, abs=1e-6)
    assert result["pixels"] == 4 and sum(b["count"] for b in result["bins"]) == 4

    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(3, 5, 16, 16, generator=gen).mul(2).softmax(1)
    target = torch.randint(0, 5, (3, 16, 16), generator=gen)
    target[:, :3] = IGNORE
    bins = ReliabilityBins(15)
    bins.update(probs, target, IGNORE)
    reference = MulticlassCalibrationError(5, n_bins=15, ignore_index=IGNORE)(probs, target)
    # float32 confidences summed in float64 vs torchmetrics' float32 sums over 624 pixels: ~1e-6.
    assert bins.compute()["ece"] == pytest.approx(float(reference), abs=1e-5)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(100_000, 4, generator=gen) * 3
    target = torch.multinomial((logits / 2.5).softmax(1), 1, generator=gen)[:, 0]
    # The maximum-likelihood T from 1e5 samples has a standard error of about 0.01 here.
    assert fit_temperature(logits, target) == pytest.approx(2.5, abs=0.06)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("calibration")
    root = write_folder_dataset(base / "data", count=8, num_classes=3)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            *(o for o in TINY if not o.startswith("dataset.")), "dataset=folder", f"dataset.root={root}",
            "dataset.num_classes=3", "dataset.image_size=[32,32]", "trainer.max_steps=4",
        ])
    fit(cfg, base / "run")
    return base / "run"


@pytest.mark.slow
def test_calibrate_stores_a_temperature_that_load_applies(tiny_run, tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes((tiny_run / "checkpoints" / "best.pt").read_bytes())
    before = load_checkpoint(checkpoint)
    done = subprocess.run([sys.executable, "-m", "segkit.cli.calibrate", f"checkpoint={checkpoint}",
                           "progress_bar=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = load_checkpoint(checkpoint)
    record = after["calibration"]
    assert record["split"] == "val" and record["pixels"] > 0 and record["temperature"] > 0
    assert record["temperature"] != 1.0
    for key in before["model"]:  # nothing else changed
        assert torch.equal(before["model"][key], after["model"][key])

    calibrated, raw = segkit.load(checkpoint, "cpu"), segkit.load(tiny_run / "checkpoints" / "best.pt", "cpu")
    assert calibrated.temperature == record["temperature"] and raw.temperature == 1.0
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # one division of float32 logits: relative error of one rounding
    torch.testing.assert_close(calibrated.logits(images), raw.logits(images) / record["temperature"],
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(one_tensor(calibrated.predict(images)), one_tensor(raw.predict(images)))  # masks never change

    after["calibration"] = {"temperature": -1.0}
    save_checkpoint(after, checkpoint)
    with pytest.raises(CheckpointError, match="temperature"):
        segkit.load(checkpoint, "cpu")


def test_evaluate_writes_ece_reliability_diagram_and_uncertainty_maps(tiny_run, tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"checkpoint={tiny_run / 'checkpoints' / 'best.pt'}", f"output_dir={tmp_path}", "progress_bar=false",
            "uncertainty_maps=true",
        ])
    metrics = evaluate_cli.run(cfg)
    calibration = metrics["calibration"]
    assert calibration["n_bins"] == 15 and calibration["temperature"] == 1.0
    assert 0.0 <= calibration["ece"] <= 1.0 and calibration["pixels"] == sum(b["count"] for b in calibration["bins"])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["calibration"]["ece"] == pytest.approx(calibration["ece"])
    assert (tmp_path / "report" / "images" / "reliability.png").is_file()
    html = (tmp_path / "report" / "report.html").read_text()
    assert "reliability.png" in html and "ECE (15 bins)" in html and "<th>precision</th>" in html
    # the worst images' uncertainty maps beside their prediction overlays (confidence and entropy: no sampling)
    assert len(re.findall(r'<img src="images/figure_\d+_[^"]+_uncertainty\.png"', html)) == 8
    for name in ("confidence", "entropy"):
        maps = sorted((tmp_path / "per_image").glob(f"*_{name}.png"))
        assert len(maps) == 8
        with Image.open(maps[0]) as picture:
            assert picture.size == (48, 40) and picture.mode == "L"  # the original image size
    assert not math.isnan(calibration["ece"])


def test_evaluate_tta_variance_maps_and_the_report_shows_every_map(tiny_run, tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        tta = [f"checkpoint={tiny_run / 'checkpoints' / 'best.pt'}", "progress_bar=false", "tta=true",
               "tta_scales=[0.75,1.0]", "tta_flip=true"]
        sampled = compose(config_name="evaluate", overrides=[
            *tta, f"output_dir={tmp_path / 'sampled'}", "uncertainty_maps=true", "uncertainty_method=tta_variance",
            "worst_n=2", "worst_per_class=0",
        ])
        plain = compose(config_name="evaluate", overrides=[*tta, f"output_dir={tmp_path / 'plain'}", "report=false"])
    metrics = evaluate_cli.run(sampled)
    assert metrics["uncertainty_method"] == "tta_variance"
    assert metrics["confusion_matrix"] == evaluate_cli.run(plain)["confusion_matrix"]  # the masks are plain TTA's
    maps = sorted((tmp_path / "sampled" / "per_image").glob("*_variance.png"))
    assert len(maps) == 8
    with Image.open(maps[0]) as picture:
        assert picture.size == (48, 40) and picture.mode == "L"  # the original image size
    report = tmp_path / "sampled" / "report"
    panels = re.findall(r'<img src="(images/figure_\d+_[^"]+_uncertainty\.png)"', (report / "report.html").read_text())
    assert len(panels) == 2
    with Image.open(report / panels[0]) as picture:  # prediction overlay + confidence, entropy, variance
        assert picture.size[0] > 4 * 200


def test_mc_dropout_on_a_model_without_dropout_is_one_line(tiny_run, tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"checkpoint={tiny_run / 'checkpoints' / 'best.pt'}", f"output_dir={tmp_path}", "progress_bar=false",
            "uncertainty_method=mc_dropout",
        ])
    with pytest.raises(ConfigError, match=r"^uncertainty_method: mc_dropout needs dropout, and this model has no "
                                          r"dropout layer .*zero variance; use uncertainty_method=tta_variance"):
        evaluate_cli.run(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_safetensors_export_carries_the_temperature(tiny_run, tmp_path):
    checkpoint = tmp_path / "best.pt"
    state = load_checkpoint(tiny_run / "checkpoints" / "best.pt")
    state["calibration"] = {"temperature": 2.5}  # as segkit-calibrate stores it
    save_checkpoint(state, checkpoint)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"checkpoint={checkpoint}", "format=safetensors",
                                                        "benchmark=false"])
    weights = export_cli.run(cfg)["files"]["safetensors"]
    from_pt, from_safetensors = segkit.load(checkpoint, "cpu"), segkit.load(weights, "cpu")
    raw = segkit.load(tiny_run / "checkpoints" / "best.pt", "cpu")
    assert from_safetensors.temperature == from_pt.temperature == 2.5
    assert from_safetensors.geometry == from_pt.geometry
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    calibrated = from_pt.probabilities(images)
    assert torch.equal(from_safetensors.probabilities(images), calibrated)
    assert not torch.allclose(raw.probabilities(images), calibrated, atol=1e-3)
