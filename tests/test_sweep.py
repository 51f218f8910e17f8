"""Multirun end to end: a failing job is recorded and the sweep goes on; report; exact reproduction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from segkit.cli import report
from segkit.trackers.mlflow import default_tracking_uri

from .conftest import CONF_DIR, ROOT, read_csv

SWEEP_TINY = [
    "backbone.name=test_resnet", "dataset.image_size=[32,32]", "dataset.train_size=8", "dataset.val_size=4",
    "trainer.batch_size=4", "trainer.num_workers=0", "trainer.max_epochs=1", "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1", "trainer.deterministic=true",
]


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """2 x 2 sweep where unet with output_stride=8 fails (unet takes no output_stride): 3 ok + 1 failed."""
    root = tmp_path_factory.mktemp("sweep_root")
    result = run(["train.py", "-m", "model=fcn,unet", "backbone.output_stride=null,8", *SWEEP_TINY,
                  f"output_root={root}", f"hydra.sweep.dir={root / 'sweep'}"])
    return result, root / "sweep", root


@pytest.mark.slow
def test_sweep_goes_on_past_a_failing_job(sweep):
    result, sweep_dir, _ = sweep
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 jobs, 3 ok, 1 failed" in result.stdout, result.stdout[-3000:]
    jobs = sorted(d.name for d in sweep_dir.iterdir() if d.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    finished = [d for d in jobs if (sweep_dir / d / "metrics.json").is_file()]
    assert finished == ["0", "1", "2"]
    failed = json.loads((sweep_dir / "3" / "failed.json").read_text())
    assert failed["error"].startswith("backbone.output_stride: unet")
    assert "model=unet" in failed["overrides"] and "backbone.output_stride=8" in failed["overrides"]
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["ok"] == ["0", "1", "2"] and summary["failed"] == ["3"]


@pytest.mark.slow
def test_every_job_is_an_mlflow_run_the_failed_one_marked_failed(sweep):
    from mlflow.tracking import MlflowClient

    _, sweep_dir, root = sweep
    client = MlflowClient(tracking_uri=default_tracking_uri(root))
    experiment = client.get_experiment_by_name("train")
    assert experiment is not None
    runs = {r.data.tags["job_num"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["0", "1", "2", "3"]
    assert [runs[j].info.status for j in "0123"] == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert runs["3"].data.tags["error"].startswith("backbone.output_stride")
    assert {r.data.tags["sweep_id"] for r in runs.values()} == {str(sweep_dir.resolve())}
    assert runs["2"].data.tags["choice.model"] == "unet"
    assert json.loads(runs["1"].data.tags["overrides"])[:2] == ["model=fcn", "backbone.output_stride=8"]


@pytest.mark.slow
def test_report_ranks_ok_runs_and_lists_the_failed_one(sweep, tmp_path):
    _, sweep_dir, root = sweep
    assert report.main([str(sweep_dir), "--out", str(tmp_path / "dir")]) == 0
    rows = read_csv(tmp_path / "dir" / "leaderboard.csv")
    assert [r["status"] for r in rows] == ["FINISHED"] * 3 + ["FAILED"]
    scores = [float(r["best_val_miou"]) for r in rows[:3]]
    assert scores == sorted(scores, reverse=True)
    assert all(int(r["params"]) > 0 for r in rows[:3]) and rows[3]["params"] == ""
    assert {"iou_background", "iou_disc", "iou_square", "iou_triangle"} <= set(rows[0])
    assert "unet does not use output_stride" in rows[3]["error"]
    text = (tmp_path / "dir" / "leaderboard.md").read_text()
    assert "4 runs: 3 ok, 1 failed." in text and "`backbone.output_stride=8`" in text
    assert (tmp_path / "dir" / "leaderboard_heatmap.png").stat().st_size > 1000

    uri = default_tracking_uri(root)
    assert report.main(["--experiment", "train", "--tracking-uri", uri, "--out", str(tmp_path / "ml")]) == 0
    from_mlflow = read_csv(tmp_path / "ml" / "leaderboard.csv")
    assert sorted(r["status"] for r in from_mlflow) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    by_job = {r["job"]: r for r in from_mlflow}
    for row in rows[:3]:
        assert by_job[row["job"]]["best_val_miou"] == row["best_val_miou"]


@pytest.mark.slow
def test_reproducing_a_job_gives_identical_final_metrics(sweep, tmp_path):
    _, sweep_dir, _ = sweep
    out = tmp_path / "again"
    result = run(["-m", "segkit.cli.reproduce", str(sweep_dir / "0"), "--out", str(out), "--check"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "identical" in result.stdout
    original = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    again = json.loads((out / "metrics.json").read_text())
    assert again["final"] == original["final"] and again["steps"] == original["steps"] == 2


def _hydra_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True).hydra


def test_launcher_presets_compose():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    parallel = _hydra_cfg(["hydra/launcher=parallel"]).launcher
    assert parallel._target_.endswith("JoblibLauncher") and parallel.n_jobs == 2
    slurm = _hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.timeout_min, slurm.gpus_per_node) == ("gpu", 240, 1)
    assert slurm.tasks_per_node == 1
