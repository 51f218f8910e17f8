"""MLflow tracker: one experiment per task_name, one run per training, local sqlite store by default.

Everything goes through `MlflowClient` with the run id (not the fluent `mlflow.start_run` state),
so several runs in one process (a sweep) never mix. The constructor only stores settings: connecting happens in
`start`, where a failure (unreachable server, locked database) is a warning, not a crash.

Everything else segkit asks of MLflow is here too, behind public names: `tag_runs` (an Optuna
trial's outcome on its runs, segkit/search.py) and `experiment_runs` (segkit-report --experiment).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segkit import safe_files
from segkit.errors import SegkitError
from segkit.registry import register
from segkit.runs.run_dir import BEST, RunDir, read_summary
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


@register("tracker")
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
    with safe_files.open_lock(lock) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, `_ - . /` and spaces; anything else (class `a:b`) becomes `_`."""
    return _BAD_KEY_CHARS.sub("_", str(key))


def tag_runs(node: Mapping[str, Any], run_dir: Path, tags: Mapping[str, str]) -> None:
    """Tag the MLflow run(s) of `run_dir` (a resumed run may have several) in the store the tracker
    config `node` (logger.mlflow) names. Never raises: a failure is a warning."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=node.get("tracking_uri") or default_tracking_uri(node["output_root"]))
        experiment = client.get_experiment_by_name(str(node["experiment_name"]))
        if experiment is None:
            return
        where = str(Path(run_dir).resolve()).replace("'", "\\'")
        for run in client.search_runs([experiment.experiment_id], filter_string=f"tags.run_dir = '{where}'"):
            for key, value in tags.items():
                client.set_tag(run.info.run_id, key, value)
    except Exception as error:  # noqa: BLE001 - tagging never fails what it records
        log.warning("could not tag the MLflow run of %s (%s)", run_dir, error)


@dataclass
class RunRecord:
    """One run of an MLflow experiment, as segkit-report ranks it."""

    run_id: str
    run_name: str | None
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # the last value of each
    seconds: float | None  # start to end; None while running
    summary: dict[str, Any] | None  # the run's metrics.json artifact; None for a failed run
    best_miou: float | None  # the summary's best, else the highest val/miou logged


def experiment_runs(experiment: str, tracking_uri: str) -> list[RunRecord]:
    """Every run of `experiment` at `tracking_uri`, oldest first; SegkitError when there is no such experiment."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run otherwise
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SegkitError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    runs: list[Any] = []
    token: str | None = None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    store = store_directory(tracking_uri)
    return [_record(client, run, store) for run in runs]


def store_directory(tracking_uri: str) -> Path | None:
    """The local directory of an MLflow store (`sqlite:///<dir>/mlflow.db`, `file:///<dir>`, `<dir>`); None
    for a server."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        return Path(unquote(parsed.path)).resolve().parent if parsed.path not in ("", "/") else None
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if parsed.scheme == "":
        return Path(tracking_uri).resolve()
    return None


def local_artifact_dir(artifact_uri: str, store: Path | None) -> Path | None:
    """The run's artifact directory when it is a local path under the store's directory, else None: an
    artifact location is written by whoever wrote the store, and a server it names is never contacted."""
    from urllib.parse import unquote, urlparse

    if store is None or not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" and artifact_uri.startswith("/"):
        path = Path(artifact_uri)
    else:
        return None
    path = Path(os.path.normpath(path))
    return path if path == store or store in path.parents else None


def _record(client: Any, run: Any, store: Path | None) -> RunRecord:
    summary = _summary(run, store)
    best = (summary or {}).get("best") or {}
    if best.get("miou") is not None:
        miou: float | None = float(best["miou"])
    else:
        history = [m.value for m in client.get_metric_history(run.info.run_id, "val/miou")]
        miou = max(history) if history else None
    return RunRecord(
        run_id=run.info.run_id, run_name=run.info.run_name, status=run.info.status, tags=dict(run.data.tags),
        params=dict(run.data.params), metrics=dict(run.data.metrics),
        seconds=(run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
        summary=summary, best_miou=miou,
    )


def _summary(run: Any, store: Path | None) -> dict[str, Any] | None:
    """The run's metrics.json artifact, read from the local store only; None when it has none."""
    directory = local_artifact_dir(str(run.info.artifact_uri or ""), store)
    if directory is None:
        print(f"warning: run {run.info.run_id}: artifact location {str(run.info.artifact_uri)[:200]!r} is not a "
              f"local path under the store ({store or 'a server'}); not fetched, the store's metrics are shown",
              file=sys.stderr)
        return None
    return read_summary(directory / "metrics.json")  # None for a failed run (no metrics.json), a link, a bomb
