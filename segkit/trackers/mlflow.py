"""MLflow tracker: one experiment per task_name, one run per training, local sqlite store by default.

Everything goes through `MlflowClient` with the run id (not the fluent `mlflow.start_run` state),
so several runs in one process (a sweep) never mix. The constructor only stores settings: connecting happens in
`start`, where a failure (unreachable server, locked database) is a warning, not a crash.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from segkit.runs.run_dir import BEST, RunDir
from segkit.trackers.base import Tracker
from segkit.trackers.context import hydra_context, run_tags

log = logging.getLogger(__name__)

MAX_VALUE_CHARS = 500  # the oldest servers' limit for a param value; newer allow 6000
MAX_TAG_CHARS = 5000
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


def default_tracking_uri(output_root: str | Path) -> str:
    """`sqlite:///<absolute output_root>/mlflow.db`: absolute, so every job of a sweep shares it."""
    root = Path(output_root).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(output_root: str | Path) -> str:
    return (Path(output_root).resolve() / "mlartifacts").as_uri()


class MLflowTracker(Tracker):
    """Logs params, tags, per-step metrics and the run's config/metrics files to MLflow."""

    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "train",
                 output_root: str = "outputs", log_checkpoint: bool = False,
                 request_timeout: int = 10, request_retries: int = 3) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.output_root = output_root
        self.log_checkpoint = log_checkpoint
        self.request_timeout = request_timeout
        self.request_retries = request_retries
        self.client: Any = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None

    # ------------------------------------------------------------------ Tracker
    def start(self, run_dir: Path, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        # An unreachable server should cost seconds, not MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.request_timeout))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(self.request_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        from mlflow.tracking import MlflowClient

        local = self.tracking_uri is None
        uri = default_tracking_uri(self.output_root) if self.tracking_uri is None else self.tracking_uri
        if local:
            Path(self.output_root).mkdir(parents=True, exist_ok=True)
        with sqlite_init_lock(uri):  # parallel jobs (joblib launcher) must not both create the schema
            self.client = MlflowClient(tracking_uri=uri)
            artifacts = default_artifact_location(self.output_root) if local else None
            experiment_id = self._experiment_id(artifacts)
        context = hydra_context()
        all_tags = {k: v[:MAX_TAG_CHARS] for k, v in run_tags(run_dir, params, tags, context).items()}
        all_tags["mlflow.source.git.commit"] = all_tags["git.commit"]
        run = self.client.create_run(experiment_id, run_name=context.run_name, tags=all_tags)
        self.run_id, self.run_dir = run.info.run_id, Path(run_dir)
        try:
            self._log_params(params)
            self.log_artifact(RunDir(self.run_dir).config)
            hydra_dir = RunDir(self.run_dir).hydra
            if hydra_dir.is_dir():
                self.client.log_artifacts(self.run_id, str(hydra_dir), artifact_path="hydra")
        except Exception:
            self.client.set_terminated(self.run_id, "FAILED")  # not left RUNNING once this tracker is dropped
            raise
        log.info("mlflow: run %s in experiment %r at %s", self.run_id, self.experiment_name, uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(entries), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[i:i + METRICS_PER_BATCH])

    def log_artifact(self, path: Path) -> None:
        if self.run_id is not None and Path(path).is_file():
            self.client.log_artifact(self.run_id, str(path))

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        # key + step: the UI's image panel shows the series with a step slider.
        self.client.log_image(self.run_id, image, key=metric_key(name), step=step)

    def finish(self, status: str) -> None:
        if self.log_checkpoint and self.run_dir is not None:
            best = RunDir(self.run_dir).checkpoint(BEST)
            if best.is_file():
                self.client.log_artifact(self.run_id, str(best), artifact_path="checkpoints")
        self.client.set_terminated(self.run_id, status)

    # ------------------------------------------------------------------ helpers
    def _experiment_id(self, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=artifact_location)
        except Exception:  # noqa: BLE001 - another job of a parallel sweep created it first
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        values = {metric_key(k): str(v)[:MAX_VALUE_CHARS] for k, v in params.items()}
        entries = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(entries), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=entries[i:i + PARAMS_PER_BATCH])


@contextmanager
def sqlite_init_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside a sqlite store while the first access migrates its schema."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no lock; parallel local sweeps there may warn once per job
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, `_ - . /` and spaces; anything else (class `a:b`) becomes `_`."""
    return _BAD_KEY_CHARS.sub("_", str(key))
