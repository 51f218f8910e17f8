"""Trackers: MLflow read back from a sqlite store, W&B offline and TensorBoard files, failures only warn."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from segkit.engine.trainer import fit
from segkit.trackers.base import Tracker
from segkit.trackers.mlflow import MLflowTracker, default_tracking_uri

from .conftest import ROOT


class RaisingTracker(Tracker):
    """Fails on every metric: training must go on without it."""

    finished = False

    def log_metrics(self, metrics, step):
        raise RuntimeError("tracker exploded")

    def finish(self, status):
        RaisingTracker.finished = True


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory) -> Path:
    """One sqlite store for the module: creating the MLflow schema costs seconds."""
    return tmp_path_factory.mktemp("mlflow_store")


def client_for(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=default_tracking_uri(root))


def only_run(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, experiment
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return found, runs[0]


def test_mlflow_records_params_metrics_tags_and_artifacts(compose_cfg, tmp_path, mlflow_root):
    cfg = compose_cfg(["logger=mlflow", f"output_root={mlflow_root}", "task_name=mlflow_fit",
                       "trainer.max_epochs=2", "logger.mlflow.log_checkpoint=true", "model=fcn"])
    summary = fit(cfg, tmp_path / "run")
    client = client_for(mlflow_root)
    experiment, run = only_run(client, "mlflow_fit")
    assert experiment.artifact_location == (mlflow_root / "mlartifacts").resolve().as_uri()
    assert run.info.status == "FINISHED" and run.info.run_name == "run"  # no Hydra app around fit()

    params = run.data.params
    assert params["model.arch"] == "fcn" and params["trainer.max_epochs"] == "2"
    assert params["backbone.name"] == "test_resnet"
    tags = run.data.tags
    assert tags["device"] == "cpu" and tags["seed"] == "42"
    assert tags["git.dirty"] in ("true", "false", "unknown") and tags["git.commit"]
    assert tags["version.torch"] == metadata.version("torch")
    assert {"version.timm", "version.smp", "version.kornia"} <= set(tags)

    run_id = run.info.run_id
    val = client.get_metric_history(run_id, "val/miou")
    assert [m.step for m in val] == [4, 8]  # 16 images / batch 4 = 4 steps per epoch
    assert val[-1].value == pytest.approx(summary["final"]["miou"])
    assert len(client.get_metric_history(run_id, "train/loss")) == 8  # log_every_n_steps=1

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.json", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pt"]
    logged = json.loads(Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path))).read_text())
    assert logged["best_score"] == summary["best_score"]


def test_mlflow_batches_long_and_many_params(tmp_path, mlflow_root):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("a: 1\n")
    params = {f"group.p{i}": i for i in range(250)} | {"long": "x" * 2000, "odd:key": None}
    tracker = MLflowTracker(experiment_name="mlflow_direct", output_root=str(mlflow_root))
    tracker.start(run_dir, params, {"device": "cpu"})
    tracker.log_metrics({"val/iou_a:b": 0.5, "val/miou": math.nan}, step=3)
    (run_dir / "metrics.json").write_text("{}")
    tracker.log_artifact(run_dir / "metrics.json")
    tracker.finish("KILLED")

    client = client_for(mlflow_root)
    _, run = only_run(client, "mlflow_direct")
    assert run.info.status == "KILLED"
    assert len(run.data.params) == 252
    assert run.data.params["long"] == "x" * 500 and run.data.params["odd_key"] == "None"
    assert run.data.metrics["val/iou_a_b"] == 0.5 and math.isnan(run.data.metrics["val/miou"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "metrics.json"}


def test_failing_trackers_only_warn(compose_cfg, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    RaisingTracker.finished = False
    cfg = compose_cfg([
        "model=fcn", "logger=mlflow",
        "logger.mlflow.tracking_uri=http://127.0.0.1:9",  # nothing listens there
        "+logger.raising._target_=tests.test_tracking.RaisingTracker",
    ])
    summary = fit(cfg, tmp_path)
    assert summary["status"] == "FINISHED" and summary["steps"] == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("tracker mlflow failed in start" in w for w in warnings), warnings
    assert sum("tracker raising failed in log_metrics" in w for w in warnings) == 1  # dropped after one
    assert not RaisingTracker.finished


def test_wandb_offline_and_tensorboard_write_into_the_run_dir(compose_cfg, tmp_path, caplog, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    run_dir = tmp_path / "run"
    summary = fit(compose_cfg(["logger=[wandb,tensorboard]", "model=fcn"]), run_dir)
    assert summary["status"] == "FINISHED"
    assert not [r for r in caplog.records if "tracker" in r.getMessage() and r.levelname == "WARNING"]

    (offline,) = run_dir.glob("wandb/offline-run-*")
    assert list(offline.glob("run-*.wandb")) and (offline / "files" / "config.yaml").is_file()
    synced = json.loads((offline / "files" / "metrics.json").read_text())  # attached before wandb.finish()
    assert synced["status"] == "FINISHED" and synced["best_score"] == summary["best_score"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    miou = events.Scalars("val/miou")
    assert [e.step for e in miou] == [4] and miou[0].value == pytest.approx(summary["final"]["miou"])


def test_default_logger_is_console_and_mlflow_and_groups_combine(compose_cfg):
    assert set(compose_cfg(tiny=False).logger) == {"console", "mlflow"}
    combined = compose_cfg(["logger=[mlflow,wandb,tensorboard]"]).logger
    assert set(combined) == {"mlflow", "wandb", "tensorboard"}


def test_importing_trackers_does_not_import_their_libraries():
    code = ("import sys, segkit, segkit.trackers.mlflow, segkit.trackers.wandb, segkit.trackers.tensorboard; "
            "print(sorted(m for m in ('mlflow', 'wandb', 'tensorboard', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_validation_overlays_reach_every_tracker(compose_cfg, tmp_path, caplog, monkeypatch, mlflow_root):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    run_dir = tmp_path / "run"
    cfg = compose_cfg(["logger=[mlflow,wandb,tensorboard]", f"output_root={mlflow_root}", "task_name=overlays",
                       "trainer.max_epochs=3", "trainer.log_images_every_n_val=2", "trainer.log_images_count=3"])
    assert fit(cfg, run_dir)["status"] == "FINISHED"
    assert not [r for r in caplog.records if "tracker" in r.getMessage() and r.levelname == "WARNING"]

    # The 2nd validation of 3 (step 8): 3 rows of image | prediction | ground truth | errors, 32x32 tiles.
    (saved,) = run_dir.glob("val_images/*.png")
    assert saved.name == "step_0000008.png"
    from PIL import Image

    with Image.open(saved) as picture:
        assert picture.size == (2 + 4 * 34, 2 + 3 * 34)

    _, run = only_run(client_for(mlflow_root), "overlays")
    images = [a.path for a in client_for(mlflow_root).list_artifacts(run.info.run_id, "images")]
    assert any("overlays+step+8+" in path and path.endswith(".png") for path in images), images  # MLflow naming

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (logged,) = events.Images("val/overlays")
    assert logged.step == 8 and (logged.width, logged.height) == (2 + 4 * 34, 2 + 3 * 34)

    (offline,) = run_dir.glob("wandb/offline-run-*")
    assert list(offline.glob("files/media/images/val/overlays_8_*.png"))
