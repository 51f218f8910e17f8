"""The training loop end to end on the synthetic set: it learns, resumes exactly, and reports errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from segkit.engine.seeding import seed_everything
from segkit.engine.trainer import Trainer, fit
from segkit.metrics import SegmentationMetrics
from segkit.runs.checkpoint import load_checkpoint

from .conftest import ROOT, read_csv

LEARN = [
    "model=unet", "dataset.image_size=[32,32]", "dataset.train_size=64", "dataset.val_size=16",
    "trainer.batch_size=8", "trainer.max_epochs=8", "optimizer=adamw", "optimizer.lr=0.003",
    "augmentation=light", "trainer.log_every_n_steps=8",
]


def test_training_learns_beyond_an_untrained_model(compose_cfg, tmp_path):
    cfg = compose_cfg(LEARN)
    untrained = Trainer(cfg, tmp_path / "untrained").validate()["miou"]
    summary = fit(cfg, tmp_path / "run")
    assert summary["status"] == "FINISHED"
    trained = summary["best"]["miou"]
    assert trained > 0.45 and trained > untrained + 0.2, f"untrained {untrained:.3f} vs trained {trained:.3f}"


def test_run_directory_holds_checkpoints_and_record(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer.max_epochs=2"])
    fit(cfg, tmp_path)
    for name in ("config.yaml", "epochs.csv", "metrics.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 2 * (16 // 4) and metrics["epochs"] == 2
    assert set(metrics["best"]["per_class_iou"]) == {"background", "disc", "square", "triangle"}
    assert len((tmp_path / "epochs.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "progress", "rng", "config"):
        assert key in state
    assert state["progress"]["global_step"] == metrics["steps"]


def test_metrics_json_is_strict_json_when_a_class_has_no_pixels(compose_cfg, tmp_path, monkeypatch):
    """A class with no pixels and no predictions scores NaN; metrics.json writes it as null."""
    compute = SegmentationMetrics.compute

    def without_triangles(self):
        result = compute(self)
        result["per_class_iou"]["triangle"] = float("nan")  # what compute gives a class absent from the split
        return result

    monkeypatch.setattr(SegmentationMetrics, "compute", without_triangles)
    fit(compose_cfg(), tmp_path)

    def refuse(constant: str) -> None:
        pytest.fail(f"metrics.json holds {constant}, which strict JSON parsers refuse")

    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["final"]["per_class_iou"]["triangle"] is None
    assert metrics["best"]["per_class_iou"]["triangle"] is None
    assert metrics["final"]["per_class_iou"]["background"] >= 0  # the other classes keep their scores


def _weights(path):
    return load_checkpoint(path)["model"]


ACCUMULATE = ["trainer.accumulate_grad_batches=2", "dataset.train_size=20"]  # 5 batches: 2 steps + 1 left over


@pytest.mark.parametrize(
    ("stop_after", "extra"),
    [(4, []), (6, []), (3, ACCUMULATE)],  # an epoch boundary, mid-epoch, mid-epoch with accumulation
)
def test_resume_gives_identical_weights_and_metrics(compose_cfg, tmp_path, stop_after, extra):
    common = ["trainer.max_epochs=3", "trainer.deterministic=true", "augmentation=default", "model=deeplabv3plus",
              *extra]
    straight = fit(compose_cfg(common), tmp_path / "straight")

    stopped = fit(compose_cfg([*common, f"trainer.stop_after_steps={stop_after}"]), tmp_path / "split")
    assert stopped["status"] == "STOPPED" and stopped["steps"] == stop_after
    resumed = fit(compose_cfg([*common, "trainer.resume=auto"]), tmp_path / "split")

    assert resumed["steps"] == straight["steps"]
    assert resumed["final"] == straight["final"]
    a, b = _weights(tmp_path / "straight/checkpoints/last.pt"), _weights(tmp_path / "split/checkpoints/last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_from_an_epoch_end_with_an_unfinished_accumulation_window(compose_cfg, tmp_path):
    """The left-over batch of an epoch is dropped, so a run killed after epoch 2 resumes identically."""
    common = ["trainer.max_epochs=3", "trainer.deterministic=true", *ACCUMULATE]
    straight = fit(compose_cfg(common), tmp_path / "straight")
    assert straight["steps"] == 6
    after_epoch_2 = tmp_path / "after_epoch_2.pt"
    shutil.copy(tmp_path / "straight/checkpoints/last.prev.pt", after_epoch_2)
    assert load_checkpoint(after_epoch_2)["progress"]["epoch"] == 2
    resumed = fit(compose_cfg([*common, f"trainer.resume={after_epoch_2}"]), tmp_path / "resumed")
    assert resumed["final"] == straight["final"]
    a, b = _weights(tmp_path / "straight/checkpoints/last.pt"), _weights(tmp_path / "resumed/checkpoints/last.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_loss_term_switches_on_at_its_epoch_in_training(compose_cfg, tmp_path):
    """Lovász from epoch 2 of 3: the weights after epoch 2 are those of CE + Dice alone, bit for bit (the
    term is not even computed before), the final ones differ; a run stopped mid-epoch 1 resumes onto it."""
    common = ["trainer.max_epochs=3", "trainer.deterministic=true", "augmentation=default"]
    late = [*common, "loss=ce_dice_lovasz", "loss.from_epoch.lovasz=2"]
    plain = fit(compose_cfg([*common, "loss=ce_dice"]), tmp_path / "plain")
    straight = fit(compose_cfg(late), tmp_path / "late")
    assert plain["steps"] == straight["steps"] == 12
    for name, same in (("last.prev.pt", True), ("last.pt", False)):
        a, b = _weights(tmp_path / "plain/checkpoints" / name), _weights(tmp_path / "late/checkpoints" / name)
        assert all(torch.equal(a[key], b[key]) for key in a) == same, name

    fit(compose_cfg([*late, "trainer.stop_after_steps=6"]), tmp_path / "split")
    resumed = fit(compose_cfg([*late, "trainer.resume=auto"]), tmp_path / "split")
    assert resumed["final"] == straight["final"]
    a, b = _weights(tmp_path / "late/checkpoints/last.pt"), _weights(tmp_path / "split/checkpoints/last.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_precisions_train_on_cpu(compose_cfg, tmp_path):
    for precision in ("bf16-mixed", "16-mixed"):
        summary = fit(compose_cfg([f"trainer.precision={precision}", "trainer.max_steps=2"]), tmp_path / precision)
        assert summary["steps"] == 2


def run_cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=no_such_model", "model"),
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("model.num_classes=7", "model.num_classes"),
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("trainer.no_such_key=1", "no_such_key"),
    ],
)
def test_bad_override_exits_nonzero_naming_the_key(override, expected, tmp_path):
    result = run_cli(override, f"hydra.run.dir={tmp_path}", "logger=none")
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_cfg_job_prints_the_resolved_config():
    result = run_cli("--cfg", "job", "model=deeplabv3plus", "loss=ce_dice", "optimizer.lr=0.02")
    assert result.returncode == 0, result.stderr
    assert "arch: deeplabv3plus" in result.stdout and "lr: 0.02" in result.stdout


def test_deterministic_mode_is_set_by_each_run_not_left_over_from_the_last():
    """A notebook's second fit (or the next test) gets the mode its own config asks for."""
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_epochs_csv_names_columns_that_first_appear_after_epoch_one(compose_cfg, tmp_path):
    """Validation every 2nd epoch: its values get their own named columns, the first row stays empty there."""
    summary = fit(compose_cfg(["trainer.max_epochs=2", "trainer.val_every_n_epochs=2"]), tmp_path / "run")
    rows = read_csv(tmp_path / "run" / "epochs.csv")
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert rows[0]["val/miou"] == "" and float(rows[1]["val/miou"]) == pytest.approx(summary["final"]["miou"])
    assert None not in rows[1]  # no value without a column name
