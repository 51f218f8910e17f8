"""A checkpoint is read once into a CheckpointRecord; segkit.load, the commands and exports build from it."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, cast

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segkit.cli import calibrate as calibrate_cli
from segkit.cli import export as export_cli
from segkit.config import build
from segkit.data.geometry import TrainingGeometry
from segkit.errors import CheckpointError, ConfigError, UntrustedConfigError
from segkit.inference.predictor import from_record, load
from segkit.runs.checkpoint import PT, SAFETENSORS, read_checkpoint, save_checkpoint
from segkit.runs.run_dir import RunDir

from .conftest import CONF_DIR

NAMES = ["sky", "road", "car", "tree"]  # the data set's own names: in the run's metrics.json, not in the config
GEOMETRY = {"image_size": [48, 48], "crop_size": [24, 24]}  # crop-trained: predicts in sliding windows


def write_run(compose_cfg, run: RunDir, overrides=(), **entries):
    """An untrained model saved as the trainer saves it into `run`, with `entries` added to the file."""
    cfg = compose_cfg(["model=fpn", "dataset.class_names=null", *overrides])
    stored = OmegaConf.to_yaml(cfg, resolve=True)
    cfg.backbone.pretrained = False  # building here must not download
    model = build(cfg.model, "model")
    if cfg.get("privacy") is not None:  # as the trainer trains a privacy=dp model: GroupNorm for BatchNorm
        from segkit.engine.privacy import make_model_private_compatible

        model = make_model_private_compatible(model)
    torch.manual_seed(0)
    for parameter in model.parameters():  # weights no initialisation gives: loading them must be seen
        parameter.data.normal_(0, 0.1)
    save_checkpoint({"model": model.state_dict(), "config": stored, **entries}, run.checkpoint("best.pt"))
    run.metrics.write_text(json.dumps({"class_names": NAMES}))
    return run.checkpoint("best.pt")


def export_safetensors(checkpoint, stem):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"checkpoint={checkpoint}", "format=safetensors",
                                                        "benchmark=false", f"output={stem}"])
    return export_cli.run(cfg)["files"]["safetensors"]


@pytest.mark.parametrize("private", [False, True], ids=["plain", "privacy=dp"])
def test_a_checkpoint_and_its_safetensors_export_read_to_the_same_record(compose_cfg, tmp_path, private):
    if private:
        pytest.importorskip("opacus")
    ledger = {"history": [[1.5, 0.25, 4]], "noise_multiplier": 1.5}  # as PrivateTraining.state_dict gives it
    checkpoint = write_run(compose_cfg, RunDir(tmp_path / "run"), ["privacy=dp"] if private else [],
                           geometry=GEOMETRY, calibration={"temperature": 2.5, "split": "val"},
                           **({"privacy": ledger} if private else {}))
    # Exported away from its run: what the run directory told the checkpoint must travel in the export.
    weights = export_safetensors(checkpoint, tmp_path / "shipped" / "model")
    from_pt, from_safetensors = read_checkpoint(checkpoint), read_checkpoint(weights)

    assert (from_pt.format, from_safetensors.format) == (PT, SAFETENSORS)
    assert from_pt.path == checkpoint and from_safetensors.path == weights
    assert from_pt.class_names == tuple(NAMES) and from_pt.temperature == 2.5
    assert from_pt.geometry == TrainingGeometry.from_dict(GEOMETRY)
    assert from_pt.private is private and from_pt.privacy == (ledger if private else None)
    for field in ("config", "geometry", "temperature", "class_names", "privacy"):
        assert getattr(from_safetensors, field) == getattr(from_pt, field), field
    assert from_safetensors.config.model.backbone.pretrained is False  # the file has every weight

    images = torch.rand(2, 3, 40, 60, generator=torch.Generator().manual_seed(0))
    a, b = load(checkpoint, "cpu"), load(weights, "cpu")
    assert a.class_names == b.class_names == NAMES
    assert torch.equal(a.logits(images), b.logits(images))


def test_calibrate_refuses_an_export_before_any_work(compose_cfg, tmp_path):
    checkpoint = write_run(compose_cfg, RunDir(tmp_path / "run"))
    weights = export_safetensors(checkpoint, tmp_path / "run" / "checkpoints" / "best")
    before = weights.read_bytes()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="calibrate", overrides=[f"checkpoint={weights}", "progress_bar=false"])
    with pytest.raises(ConfigError, match=r"^checkpoint: .*best\.safetensors: calibrate the \.pt checkpoint"):
        calibrate_cli.run(cfg)
    assert weights.read_bytes() == before


def test_a_foreign_config_is_refused_by_the_reader_and_nothing_is_called(compose_cfg, tmp_path):
    cfg = compose_cfg(["model=fpn"])
    made = tmp_path / "made"
    config = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    config["model"] = {"_target_": "os.makedirs", "name": str(made)}
    checkpoint = tmp_path / "theirs.pt"
    save_checkpoint({"model": {}, "config": OmegaConf.to_yaml(config)}, checkpoint)
    with pytest.raises(UntrustedConfigError, match=r"theirs\.pt: model\._target_: 'os\.makedirs' refused"):
        read_checkpoint(checkpoint)
    with pytest.raises(UntrustedConfigError, match=r"theirs\.pt: model\._target_"):
        load(checkpoint, "cpu")
    trusted = read_checkpoint(checkpoint, trust=True)  # reading builds nothing, even when trusted
    assert trusted.config.model._target_ == "os.makedirs" and not made.exists()


def test_temperature_and_geometry_of_the_record_reach_the_predictions(compose_cfg, tmp_path):
    checkpoint = write_run(compose_cfg, RunDir(tmp_path / "run"), geometry=GEOMETRY,
                           calibration={"temperature": 2.0})
    record = read_checkpoint(checkpoint)
    predictor = from_record(record, "cpu")
    assert predictor.geometry == record.geometry and predictor.temperature == 2.0
    images = torch.rand(1, 3, 30, 70, generator=torch.Generator().manual_seed(1))
    logits = predictor.logits(images)

    raw = from_record(replace(record, temperature=1.0), "cpu")
    torch.testing.assert_close(logits, raw.logits(images) / 2.0, rtol=1e-6, atol=1e-6)
    assert torch.equal(logits.argmax(1), raw.logits(images).argmax(1))  # masks never change

    # The recorded geometry: letterboxed into 48x48, predicted in 24x24 windows.
    assert torch.equal(logits, predictor.logits(images, mode="slide", crop_size=[24, 24], test_size=[48, 48]))
    whole = from_record(replace(record, geometry=TrainingGeometry((32, 32))), "cpu")
    assert torch.equal(whole.logits(images), predictor.logits(images, mode="whole", test_size=[32, 32]))
    assert not torch.allclose(whole.logits(images), logits, atol=1e-3)


def test_a_checkpoint_without_geometry_or_names_falls_back_to_its_config(compose_cfg, tmp_path):
    checkpoint = tmp_path / "old.pt"  # no run directory around it, no geometry entry (older checkpoints)
    cfg = compose_cfg(["model=fpn", "dataset.image_size=[40,56]", "augmentation.crop_size=[24,24]"])
    cfg.backbone.pretrained = False
    model = build(cfg.model, "model")
    save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True)}, checkpoint)
    record = read_checkpoint(checkpoint)
    assert record.geometry == TrainingGeometry((40, 56), (24, 24)) and record.temperature == 1.0
    assert record.class_names == tuple(cfg.dataset.class_names) and record.privacy is None

    state = torch.load(checkpoint, weights_only=True)
    state["model"][next(iter(state["model"]))] = torch.zeros(1)  # a shape the model does not have
    save_checkpoint(state, checkpoint)
    with pytest.raises(CheckpointError, match=r"old\.pt: weights do not fit the stored model"):
        load(checkpoint, "cpu")


def test_export_metadata_nested_too_deep_is_refused_in_one_line_before_parsing(compose_cfg, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = export_safetensors(write_run(compose_cfg, RunDir(tmp_path / "run")), tmp_path / "shipped" / "model")
    tensors = load_file(str(weights))
    bomb = "[" * 100_000 + "]" * 100_000  # 200 kB: json.loads would recurse past Python's limit and crash
    save_file(tensors, str(weights), metadata={"segkit.geometry": bomb})
    with pytest.raises(CheckpointError, match=r"metadata segkit\.geometry: JSON nested more than 32 levels") as error:
        read_checkpoint(weights)
    assert "\n" not in str(error.value)


def test_the_recorded_inference_mode_travels_and_a_foreign_one_is_refused_in_one_line(compose_cfg, tmp_path):
    """trainer.inference_mode=whole is read back from the checkpoint and its safetensors export, and decides
    what mode=auto runs; a value segkit does not know is named on one line before anything is built."""
    checkpoint = write_run(compose_cfg, RunDir(tmp_path / "run"), geometry={**GEOMETRY, "inference": "whole"})
    weights = export_safetensors(checkpoint, tmp_path / "shipped" / "model")
    images = torch.rand(2, 3, 40, 60, generator=torch.Generator().manual_seed(0))
    for path in (checkpoint, weights):
        record = read_checkpoint(path)
        assert record.geometry.mode == "whole" and record.geometry.window == (24, 24)
        predictor = from_record(record, "cpu")
        assert torch.equal(predictor.logits(images), predictor.logits(images, mode="whole"))
        assert not torch.equal(predictor.logits(images), predictor.logits(images, mode="slide"))

    foreign = write_run(compose_cfg, RunDir(tmp_path / "foreign"), geometry={**GEOMETRY, "inference": "tiles"})
    with pytest.raises(CheckpointError, match=r"best\.pt: stored training geometry is not valid \(inference must "
                                              r"be one of auto, whole, slide, got 'tiles'\)$"):
        read_checkpoint(foreign)
