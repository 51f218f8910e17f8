"""Optuna searches through segkit's sweeper: stored trials, resume after a kill, pruning, two objectives,
two workers on one study, the live dashboard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from segkit.cli import report
from segkit.search import as_override, directions, search_space

from .conftest import CONF_DIR, ROOT

optuna = pytest.importorskip("optuna")

# Trials of a few seconds: 16 train / 4 val images of 32x32, the tiny backbone, no trackers.
SEARCH_TINY = [
    "backbone.name=test_resnet", "dataset.image_size=[32,32]", "dataset.train_size=16", "dataset.val_size=4",
    "trainer.num_workers=0", "trainer.max_epochs=1", "trainer.progress_bar=false", "trainer.deterministic=true",
    "logger=none",
]


def command(tmp_path: Path, *overrides: str, preset: str = "optuna") -> list[str]:
    return [sys.executable, "train.py", "-m", f"hparams_search={preset}", *SEARCH_TINY, *overrides,
            f"output_root={tmp_path}"]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def load_study(tmp_path: Path, name: str = "train"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path.resolve() / 'optuna.db'}")


def states(study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def sweeper_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True).hydra.sweeper


def test_optuna_presets_compose():
    sweeper = sweeper_config(["hparams_search=optuna"])
    assert sweeper._target_ == "hydra_plugins.segkit_search.optuna_sweeper.OptunaSweeper"
    assert sweeper.storage is None and list(sweeper.objectives) == ["miou"]
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "loss.weights.dice",
                                   "trainer.batch_size"}
    assert sweeper_config(["hparams_search=optuna", "hydra/sweeper/pruner=hyperband"]).pruner.max_resource == 10
    pareto = sweeper_config(["hparams_search=optuna_pareto"])
    assert list(pareto.objectives) == ["miou", "latency_ms"]
    assert pareto.pruner._target_ == "optuna.pruners.NopPruner" and "model" in pareto.params


def test_hydra_sweep_syntax_becomes_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    parsed = OverridesParser.create().parse_overrides([
        "optimizer.lr=tag(log, interval(0.0001, 0.01))", "loss.weights.dice=interval(0, 2.5)",
        "trainer.max_epochs=int(interval(2, 6))", "trainer.batch_size=choice(4, 8)", "model=choice(fcn, unet)",
        "trainer.seed=range(0, 10, 5)", "trainer.precision=32"])
    space, fixed = search_space(parsed)
    assert space["optimizer.lr"] == FloatDistribution(0.0001, 0.01, log=True)
    assert space["loss.weights.dice"] == FloatDistribution(0.0, 2.5)
    assert space["trainer.max_epochs"] == IntDistribution(2, 6)
    assert space["trainer.batch_size"] == CategoricalDistribution([4, 8])
    assert space["model"] == CategoricalDistribution(["fcn", "unet"])
    assert space["trainer.seed"] == IntDistribution(0, 5, step=5)
    assert fixed == ["trainer.precision=32"]
    assert as_override("model", "unet") == "model=unet" and as_override("trainer.compile", True) == \
        "trainer.compile=true"
    assert as_override("trainer.resume", "/a b/last.pt") == 'trainer.resume="/a b/last.pt"'


def test_the_score_objective_follows_the_monitor_direction(compose_cfg):
    assert directions(["miou", "latency_ms", "params"], compose_cfg()) == ["maximize", "minimize", "minimize"]
    assert directions(["miou"], compose_cfg(["trainer.monitor=val/loss"])) == ["minimize"]


@pytest.mark.slow
def test_three_trials_are_stored_and_the_best_is_reported(tmp_path):
    run(command(tmp_path, "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2"))
    sweep_dir = tmp_path / "train" / "search" / "train"
    study = load_study(tmp_path)
    assert states(study) == ["COMPLETE"] * 3
    trials = [yaml.safe_load((sweep_dir / str(i) / ".hydra" / "overrides.yaml").read_text()) for i in range(3)]
    scores = [json.loads((sweep_dir / str(i) / "metrics.json").read_text())["best_score"] for i in range(3)]
    assert not (sweep_dir / "3").exists()
    # The stored value of each trial is its job's best val/miou; the best trial's params are its overrides.
    assert [t.value for t in study.trials] == pytest.approx(scores)
    best = max(range(3), key=lambda i: scores[i])
    record = json.loads((sweep_dir / "study.json").read_text())
    assert record["best_trials"][0]["number"] == best
    assert record["best_trials"][0]["values"] == [pytest.approx(scores[best])]
    assert {f"{k}={v}" for k, v in record["best_trials"][0]["params"].items()} <= set(trials[best])
    lrs = {next(o for o in overrides if o.startswith("optimizer.lr=")) for overrides in trials}
    assert len(lrs) == 3  # sampled, not one fixed value


@pytest.mark.slow
def test_a_search_killed_during_trial_2_resumes_from_its_checkpoint(tmp_path):
    args = command(tmp_path, "hydra.sweeper.n_trials=3", "trainer.max_epochs=8")
    sweep_dir = tmp_path / "train" / "search" / "train"
    process = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        # Trial 2 (number 1) has saved the checkpoint of its first epoch: kill the whole search, hard.
        while not (sweep_dir / "1" / "checkpoints" / "last.pt").is_file():
            assert process.poll() is None, "the search ended before trial 2 started"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    study = load_study(tmp_path)
    assert states(study)[:2] == ["COMPLETE", "RUNNING"]  # the kill left trial 2 open in the study
    first = study.trials[0].value

    run(args)  # the same command
    study = load_study(tmp_path)
    trials = study.trials
    assert sum(t.state.name == "COMPLETE" for t in trials) == 3
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].value == first  # finished trials are kept, not re-run
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == trials[1].params
    # The retry continued from trial 2's own checkpoint: it trained the remaining epochs only.
    overrides = yaml.safe_load((sweep_dir / "2" / ".hydra" / "overrides.yaml").read_text())
    assert f"trainer.resume={sweep_dir.resolve() / '1' / 'checkpoints' / 'last.pt'}" in overrides
    epochs = [int(line.split(",")[0]) for line in (sweep_dir / "2" / "epochs.csv").read_text().splitlines()[1:]]
    assert epochs[0] >= 1 and epochs == list(range(epochs[0], 8))


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_in_the_study_mlflow_and_the_report(tmp_path):
    from mlflow.tracking import MlflowClient

    from segkit.trackers.mlflow import default_tracking_uri

    # A threshold no mIoU reaches: the pruner stops the trial at its first validation.
    run(command(tmp_path, "hydra.sweeper.n_trials=1", "trainer.max_epochs=3", "logger=[mlflow]",
                "hydra/sweeper/pruner=none", "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
                "+hydra.sweeper.pruner.lower=1.5"))
    sweep_dir = tmp_path / "train" / "search" / "train"
    trial = load_study(tmp_path).trials[0]
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [0]
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["stop_reason"] == "pruned by optuna at epoch 0"

    client = MlflowClient(tracking_uri=default_tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name("train")
    assert experiment is not None
    (ml_run,) = client.search_runs([experiment.experiment_id])
    assert ml_run.info.status == "KILLED"
    assert ml_run.data.tags["optuna.state"] == "PRUNED" and ml_run.data.tags["optuna.trial"] == "0"

    assert report.main([str(sweep_dir), "--out", str(tmp_path / "report")]) == 0
    assert "1 runs: 0 ok, 0 failed, 1 pruned." in (tmp_path / "report" / "leaderboard.md").read_text()


@pytest.mark.slow
def test_two_objectives_give_a_pareto_front_in_the_report(tmp_path):
    run(command(tmp_path, "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=3",
                "hydra.sweeper.params.model='choice(fcn, unet)'", preset="optuna_pareto"))
    sweep_dir = tmp_path / "train" / "search" / "train_pareto"
    study = load_study(tmp_path, "train_pareto")
    assert len(study.directions) == 2 and states(study) == ["COMPLETE"] * 3
    front = json.loads((sweep_dir / "study.json").read_text())["best_trials"]
    assert front and all(len(t["values"]) == 2 and t["values"][1] > 0 for t in front)
    trial = json.loads((sweep_dir / "0" / "trial.json").read_text())
    assert trial["objectives"] == ["miou", "latency_ms"] and trial["latency_ms"] == trial["values"][1] > 0

    assert report.main([str(sweep_dir), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "## Pareto front (miou ↑, latency_ms ↓)" in text
    named = text.split("Non-dominated runs")[1].splitlines()[0]
    assert sorted(named.count(f"#{t['number']}") for t in front) == [1] * len(front)
    assert (tmp_path / "report" / "pareto_front.png").stat().st_size > 1000


def test_pareto_front_keeps_exactly_the_non_dominated_runs():
    def row(job: str, miou: float, latency: float) -> report.Row:
        return report.Row(job=job, overrides=[], status="FINISHED", objectives={"miou": miou, "latency_ms": latency})

    rows = [row("a", 0.8, 10.0), row("b", 0.7, 5.0), row("c", 0.6, 6.0),  # c: worse than b on both
            row("d", 0.8, 12.0),  # d: as accurate as a but slower
            row("e", 0.9, 30.0), report.Row(job="f", overrides=[], status="PRUNED")]
    front = report.pareto_front(rows, {"miou": "maximize", "latency_ms": "minimize"})
    assert sorted(r.job for r in front) == ["a", "b", "e"]


@pytest.mark.slow
def test_two_workers_share_one_study_without_collisions(tmp_path):
    args = command(tmp_path, "hydra.sweeper.n_trials=4")
    workers = [subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=500)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    study = load_study(tmp_path)
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # n_trials is the study's total, not per worker
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both ran trials
    assert len({t.params["optimizer.lr"] for t in trials}) == 4  # no two workers proposed the same trial
    sweep_dir = tmp_path / "train" / "search" / "train"
    for t in trials:  # each trial in its own job directory, written once
        assert json.loads((sweep_dir / str(t.number) / "trial.json").read_text())["number"] == t.number


BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no chromium installed (apt-get install chromium)")
@pytest.mark.skipif(shutil.which("optuna-dashboard") is None and not (Path(sys.executable).parent
                                                                       / "optuna-dashboard").exists(),
                    reason="optuna-dashboard not installed (pip install -e '.[optuna]')")
def test_optuna_dashboard_shows_the_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="segkit_dashboard_check")
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dashboard = shutil.which("optuna-dashboard") or str(Path(sys.executable).parent / "optuna-dashboard")
    server = subprocess.Popen([dashboard, storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/dashboard"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.3)
        assert BROWSER is not None
        done = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
                               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                               "--dump-dom", url], capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "segkit_dashboard_check" in done.stdout  # rendered by the page's script from the storage
    finally:
        server.terminate()
        server.wait(timeout=30)
