"""Validation loss, trainer.monitor with a mode, top-k checkpoints, EMA weights, configured metrics
and the single-logit binary mode, each through a real (tiny) training run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import segkit
from segkit.engine.step import to_model_input
from segkit.engine.trainer import Trainer, fit
from segkit.errors import ConfigError
from segkit.runs.checkpoint import load_checkpoint

from .conftest import TINY, one_tensor, read_csv, write_folder_dataset

# 4 steps per epoch, 4 validations; a noisy enough val loss that the ranking changes.
SELECT = ["trainer.max_epochs=4", "trainer.monitor=val/loss", "trainer.save_top_k=2", "trainer.ema_decay=0.5",
          "trainer.deterministic=true"]


def test_top_k_by_validation_loss_with_ema_resumes_exactly(compose_cfg, tmp_path):
    straight = fit(compose_cfg(SELECT), tmp_path / "straight")
    rows = read_csv(tmp_path / "straight" / "epochs.csv")
    losses = [float(row["val/loss"]) for row in rows]
    assert all(math.isfinite(v) and v > 0 for v in losses)

    # min mode inferred from the name; best = the lowest validation loss
    assert straight["monitor_mode"] == "min"
    assert straight["best_score"] == pytest.approx(min(losses))
    assert straight["best_epoch"] == int(np.argmin(losses))
    ranking = sorted(range(len(losses)), key=lambda e: losses[e])[:2]
    assert [entry["epoch"] for entry in straight["top_k"]] == ranking
    kept = sorted(p.name for p in (tmp_path / "straight/checkpoints").glob("epoch=*.pt"))
    assert kept == sorted(f"epoch={e:03d}-val_loss={losses[e]:.4f}.pt" for e in ranking)

    # Interrupted mid-epoch 2 and resumed: same ranking, same files, same weights (raw and EMA).
    stopped = fit(compose_cfg([*SELECT, "trainer.stop_after_steps=10"]), tmp_path / "split")
    assert stopped["status"] == "STOPPED"
    resumed = fit(compose_cfg([*SELECT, "trainer.resume=auto"]), tmp_path / "split")
    assert resumed["top_k"] == straight["top_k"]
    assert sorted(p.name for p in (tmp_path / "split/checkpoints").glob("epoch=*.pt")) == kept
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "split/checkpoints/last.pt")
    for part in ("model", "train_model"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_ema_weights_are_the_ones_validated_and_saved(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer.max_epochs=1", "trainer.ema_decay=0.5"])
    summary = fit(cfg, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    changed = [k for k in state["model"] if not torch.equal(state["model"][k], state["train_model"][k])]
    assert changed, "the EMA weights equal the raw ones"
    # The saved `model` (what segkit-evaluate / predict load) scores exactly what validation reported.
    plain = Trainer(compose_cfg(["trainer.max_epochs=1"]), tmp_path / "check")
    plain.parts.model.load_state_dict(state["model"])
    again = plain.validate()
    assert again["miou"] == summary["final"]["miou"]
    assert again["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-6)  # same batches, same order
    # The trained weights are validated beside them: val_raw/* is what EMA is compared with.
    plain.parts.model.load_state_dict(state["train_model"])
    raw = plain.validate()
    row = read_csv(tmp_path / "run" / "epochs.csv")[-1]
    assert float(row["val_raw/miou"]) == pytest.approx(raw["miou"], abs=1e-6)
    assert float(row["val_raw/loss"]) == pytest.approx(raw["loss"], rel=1e-6)
    assert float(row["val/miou"]) == pytest.approx(summary["final"]["miou"], abs=1e-6)


def test_monitor_any_logged_value_and_configured_metrics(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer.max_epochs=2", "trainer.monitor=val/boundary_iou", "metrics=[boundary_iou,f1_macro]"])
    summary = fit(cfg, tmp_path / "run")
    rows = read_csv(tmp_path / "run" / "epochs.csv")
    scores = [float(row["val/boundary_iou"]) for row in rows]
    assert summary["monitor_mode"] == "max" and summary["best_score"] == pytest.approx(max(scores))
    assert set(summary["final"]["metrics"]) == {"boundary_iou", "f1_macro"}
    assert 0.0 <= summary["final"]["metrics"]["f1_macro"] <= 1.0
    assert set(summary["final"]["per_class_precision"]) == set(summary["final"]["per_class_iou"])

    with pytest.raises(ConfigError, match="val/loss") as info:  # the message lists what can be monitored
        fit(compose_cfg(["trainer.monitor=val/nope"]), tmp_path / "bad")
    assert info.value.key == "trainer.monitor"


def test_binary_task_with_one_logit_end_to_end(compose_cfg, tmp_path):
    root = write_folder_dataset(tmp_path / "data", count=8, num_classes=2)
    overrides = [*(o for o in TINY if not o.startswith("dataset.")), "dataset=folder", f"dataset.root={root}",
                 "dataset.num_classes=2", "dataset.image_size=[32,32]", "model.num_classes=1", "loss=dice_bce",
                 "trainer.max_epochs=2", "optimizer.lr=0.01"]
    summary = fit(compose_cfg(overrides, tiny=False), tmp_path / "run")
    final = summary["final"]
    assert final["foreground_iou"] == final["per_class_iou"]["class_1"]  # a two-class report
    assert list(final["per_class_precision"]) == ["class_0", "class_1"]

    predictor = segkit.load(tmp_path / "run/checkpoints/best.pt", "cpu")
    image = torch.randint(0, 255, (3, 40, 48), dtype=torch.uint8)
    mask = one_tensor(predictor.predict(image))
    assert mask.shape == (40, 48) and set(mask.unique().tolist()) <= {0, 1}
    probs = predictor.probabilities(image[None].float() / 255)
    assert probs.shape[1] == 2 and torch.allclose(probs.sum(1), torch.ones(1))
    logit = predictor.model(to_model_input(image[None].float() / 255, predictor.device, predictor.channels_last))
    assert logit.shape[1] == 1


def test_summary_json_names_the_mode(compose_cfg, tmp_path):
    fit(compose_cfg(["trainer.monitor=train/loss"]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["monitor"] == "train/loss" and metrics["monitor_mode"] == "min"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.num_classes=1"], "model.num_classes"),  # one logit needs a two-class data set
        (["model.num_classes=1", "dataset.num_classes=2", "dataset.class_names=null"], "loss"),  # ce_dice
        (["loss=dice_bce"], "loss"),  # a binary loss on a 4-class model
        (["trainer.monitor_mode=up"], "trainer.monitor_mode"),
        (["trainer.save_top_k=-1"], "trainer.save_top_k"),
        (["trainer.ema_decay=1.0"], "trainer.ema_decay"),
        (["trainer.log_images_count=-2"], "trainer.log_images_count"),
    ],
)
def test_inconsistent_settings_fail_at_start_naming_the_key(compose_cfg, tmp_path, overrides, key):
    with pytest.raises(ConfigError) as info:
        fit(compose_cfg(overrides), tmp_path)
    assert info.value.key == key
    assert not (tmp_path / "checkpoints").exists()
