"""segkit-evaluate: the training loop's numbers, per-image records, masks and the report files."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from segkit.cli import evaluate as evaluate_cli
from segkit.engine.trainer import Trainer, fit
from segkit.errors import CheckpointError, ConfigError
from segkit.runs.checkpoint import load_checkpoint
from segkit.runs.json import json_safe

from .conftest import CONF_DIR, TINY, write_folder_dataset

CLASSES = ["class_0", "class_1", "class_2"]


def compose_config(name, overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two optimizer steps on a folder data set whose 40x48 images are letterboxed to 32x32."""
    base = tmp_path_factory.mktemp("evaluate")
    root = write_folder_dataset(base / "data", count=8, num_classes=3)
    cfg = compose_config("train", [
        *(o for o in TINY if not o.startswith("dataset.")), "dataset=folder", f"dataset.root={root}",
        "dataset.num_classes=3", "dataset.image_size=[32,32]", "trainer.max_steps=2",
    ])
    fit(cfg, base / "run")
    return base / "run", cfg


def evaluate(run_dir, out_dir, *overrides):
    cfg = compose_config("evaluate", [
        f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"output_dir={out_dir}", "progress_bar=false",
        *overrides,
    ])
    return evaluate_cli.run(cfg)


def test_metrics_equal_the_training_loop(tiny_run, tmp_path):
    run_dir, cfg = tiny_run
    trainer = Trainer(cfg, tmp_path / "trainer")
    trainer.parts.model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"])
    expected = json_safe(trainer.validate())
    metrics = evaluate(run_dir, tmp_path / "eval")
    for key in ("miou", "mdice", "pixel_acc", "per_class_iou", "per_class_dice", "confusion_matrix"):
        assert metrics[key] == expected[key], key
    recorded = json.loads((run_dir / "metrics.json").read_text())["best"]  # what fit() logged
    assert metrics["miou"] == recorded["miou"] and metrics["per_class_iou"] == recorded["per_class_iou"]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text(), parse_constant=_no_nan)
    assert written["confusion_matrix"] == expected["confusion_matrix"]
    assert list(written["per_class_iou"]) == CLASSES


def _no_nan(token):
    raise AssertionError(f"metrics.json holds {token}: not strict JSON")


def test_per_image_records_and_masks(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "eval"
    evaluate(run_dir, out, "report=false")
    lines = (out / "per_image.jsonl").read_text().splitlines()
    assert len(lines) == 8
    for line in lines:
        record = json.loads(line, parse_constant=_no_nan)
        assert set(record) == {"filename", "predicted_mask_path", "pixel_accuracy", "per_class_iou", "miou"}
        assert re.fullmatch(r"img_\d{3}\.jpg", record["filename"])
        assert record["predicted_mask_path"] == f"per_image/{record['filename'][:-4]}_pred.png"
        assert list(record["per_class_iou"]) == CLASSES
        ious = [v for v in record["per_class_iou"].values() if v is not None]
        assert all(0 <= v <= 1 for v in ious) and 0 <= record["pixel_accuracy"] <= 1
        assert math.isclose(record["miou"], sum(ious) / len(ious))
        mask = Image.open(out / record["predicted_mask_path"])
        assert mask.mode == "L" and mask.size == (48, 40)  # the original image's size, letterbox undone
        assert np.asarray(mask).max() < 3


def test_report_files(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "eval"
    evaluate(run_dir, out, "worst_n=2", "worst_per_class=0")
    html = (out / "report" / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert {"images/iou_per_class.png", "images/confusion.png", "images/training_curves.png"} <= set(sources)
    assert sum(s.startswith("images/figure_") for s in sources) == 2
    assert not any(s.endswith("_uncertainty.png") for s in sources)  # uncertainty_maps=false: no maps
    for source in sources:
        assert Image.open(out / "report" / source).size[0] > 100
    assert all(f">{name}</td>" in html for name in CLASSES)
    assert '<script src="data.js"></script>' in html and (out / "report" / "report.js").is_file()
    data = (out / "report" / "data.js").read_text()
    assert data.count('"filename":') == 8  # every image's numbers, figures or not


def test_the_report_draws_each_classs_worst_images_once(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "eval"
    evaluate(run_dir, out, "worst_n=1", "worst_per_class=2", "save_masks=false")
    records = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    shown = {min(range(8), key=lambda i: (records[i]["miou"], i))}
    for name in CLASSES:
        present = sorted((r["per_class_iou"][name], i) for i, r in enumerate(records)
                         if r["per_class_iou"][name] is not None)
        shown |= {i for _, i in present[:2]}
    figures = sorted(path.name for path in (out / "report" / "images").glob("figure_*.png"))
    assert figures == [f"figure_{i:05d}_{records[i]['filename'][:-4]}.png" for i in sorted(shown)]


def test_a_file_name_that_is_markup_stays_text(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    root = write_folder_dataset(tmp_path / "data", splits=("val",), count=2, num_classes=3)
    hostile = "<img src=x onerror=alert(1)>"
    for folder, suffix in (("images", ".jpg"), ("masks", ".png")):
        (root / folder / "val" / f"img_000{suffix}").rename(root / folder / "val" / f"{hostile}{suffix}")
    out = tmp_path / "eval"
    evaluate(run_dir, out, f"dataset.root={root}", "worst_n=2", "save_masks=false")
    assert json.loads((out / "per_image.jsonl").read_text().splitlines()[0])["filename"] == f"{hostile}.jpg"
    html = (out / "report" / "report.html").read_text()
    assert hostile not in html and "&lt;img src=x onerror=alert(1)&gt;.jpg" in html
    assert "<" not in (out / "report" / "data.js").read_text()
    assert (out / "report" / "images" / "figure_00000__img_src_x_onerror_alert_1_.png").is_file()


def test_slide_and_tta_modes_and_dataset_overrides(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    metrics = evaluate(run_dir, tmp_path / "slide", "mode=slide", "crop_size=[16,24]", "stride=[16,8]",
                       "tta=true", "tta_scales=[1.0]", "split=train", "report=false", "save_masks=false",
                       "min_region=4", "max_hole=4")
    assert metrics["images"] == 8 and metrics["mode"] == "slide" and metrics["split"] == "train"
    assert 0 <= metrics["miou"] <= 1
    other_root = write_folder_dataset(tmp_path / "other", splits=("val",), count=3, num_classes=3)
    metrics = evaluate(run_dir, tmp_path / "other_eval", f"dataset.root={other_root}", "report=false")
    assert metrics["images"] == 3


def test_errors_name_the_key_or_file(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    with pytest.raises(ConfigError, match="^mode:"):
        evaluate(run_dir, tmp_path, "mode=sideways")
    cfg = compose_config("evaluate", [f"checkpoint={tmp_path / 'missing.pt'}"])
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        evaluate_cli.run(cfg)
