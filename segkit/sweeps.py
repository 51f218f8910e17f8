"""Hydra multirun jobs: run one so a failure is recorded and the sweep goes on, read the jobs' records
back for reports, and print the sweep's summary when it ends (`SweepSummary`, a Hydra callback)."""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segkit import safe_files
from segkit.errors import SegkitError, one_line
from segkit.runs.json import dumps
from segkit.runs.run_dir import RunDir

log = logging.getLogger("segkit")
T = TypeVar("T")

TRIAL_FILE = "trial.json"  # an Optuna trial's outcome (segkit/search.py)


def run_sweep_job(job: Callable[[], T], cfg: DictConfig, output_dir: str | Path,
                  overrides: Sequence[str]) -> T | None:
    """Run one multirun job; any exception becomes failed.json and a None result."""
    output_dir = Path(output_dir)
    marker = RunDir(output_dir).config  # the trainer writes it right before starting its trackers
    before = _mtime(marker)
    try:
        return job()
    except Exception as error:  # noqa: BLE001 - one bad combination must not end the sweep
        record_failure(cfg, output_dir, error, list(overrides), trackers_started=_mtime(marker) != before)
        return None


def error_message(error: BaseException) -> str:
    if isinstance(error, SegkitError):
        return one_line(error)
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def record_failure(cfg: DictConfig, output_dir: Path, error: BaseException, overrides: list[str],
                   trackers_started: bool) -> None:
    message = error_message(error)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "error": message,
        "error_type": type(error).__name__,
        "overrides": overrides,
        "traceback": "".join(traceback.format_exception(error)),
    }
    safe_files.write_text(RunDir(output_dir).failed, json.dumps(record, indent=2))
    log.error("job failed (%s): %s; the sweep goes on", " ".join(overrides), message)
    if not trackers_started:  # failed while building (model, data): no tracker run exists yet
        _failed_tracker_run(cfg, output_dir, message)


def _failed_tracker_run(cfg: DictConfig, output_dir: Path, message: str) -> None:
    """Open and close a tracker run marked FAILED, so the sweep's tracker shows every job."""
    from segkit.trackers.base import build_trackers, flatten

    try:
        loggers = dict(cfg.get("logger") or {})
        try:
            params = flatten(cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)))
        except Exception:  # noqa: BLE001 - the failure may be a broken interpolation
            params = flatten(cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False)))
    except Exception as error:  # noqa: BLE001
        log.warning("could not record the failed job in the trackers (%s)", error)
        return
    trackers = build_trackers(loggers, skip_broken=True)
    trackers.start(output_dir, params, {"error": message})
    trackers.log_artifact(RunDir(output_dir).failed)
    trackers.finish("FAILED")


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


# ---------------------------------------------------------------------- reading a sweep back
@dataclass
class JobRecord:
    name: str
    path: Path
    overrides: list[str]
    choices: dict[str, str] = field(default_factory=dict)
    status: str = "INCOMPLETE"  # FINISHED | PRUNED | STOPPED | FAILED | INCOMPLETE (running, or crashed hard)
    error: str | None = None
    metrics: dict[str, Any] | None = None
    seconds: float | None = None
    trial: dict[str, Any] | None = None  # trial.json of a search job: number, state, objective values

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED"


def collect_jobs(sweep_dir: str | Path) -> list[JobRecord]:
    """Every job directory (one holding `.hydra/`) directly under `sweep_dir`, in job order."""
    sweep_dir = Path(sweep_dir)
    dirs = [d for d in sweep_dir.iterdir() if not d.is_symlink() and RunDir(d).hydra.is_dir()] \
        if sweep_dir.is_dir() else []
    dirs.sort(key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
    return [read_job(d) for d in dirs]


def read_job(job_dir: Path) -> JobRecord:
    run = RunDir(job_dir)
    overrides_file = run.hydra_overrides
    overrides = [str(o) for o in _plain_yaml(overrides_file) or []] if overrides_file.exists() else []
    record = JobRecord(name=job_dir.name, path=job_dir, overrides=overrides, choices=_choices(run))
    started = _mtime(run.hydra_config)
    metrics_file, failed_file = run.metrics, run.failed
    metrics_time, failed_time = _mtime(metrics_file), _mtime(failed_file)
    if failed_time is not None and (metrics_time is None or failed_time >= metrics_time):
        record.status, record.error = "FAILED", json.loads(safe_files.read_run_text(failed_file)).get("error")
        ended = failed_time
    elif metrics_time is not None:
        record.metrics = json.loads(safe_files.read_run_text(metrics_file))
        record.status, ended = record.metrics.get("status", "FINISHED"), metrics_time
    else:
        ended = None
    if started is not None and ended is not None:
        record.seconds = max(0.0, (ended - started) / 1e9)
    trial_file = job_dir / TRIAL_FILE
    if trial_file.exists():
        record.trial = json.loads(safe_files.read_run_text(trial_file))
        if record.trial.get("state") == "PRUNED":
            record.status = "PRUNED"
    return record


def _choices(run: RunDir) -> dict[str, str]:
    path = run.hydra_settings
    if not path.exists():
        return {}
    hydra = (_plain_yaml(path) or {}).get("hydra") or {}
    choices = (hydra.get("runtime") or {}).get("choices") or {}
    return {str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra/")}


def _plain_yaml(path: Path) -> Any:
    """A job's YAML as plain data: interpolations stay text (a run directory may come from someone else,
    and `${oc.env:...}` would copy this machine's environment into the report)."""
    return safe_files.read_plain_yaml(path)


def varying_overrides(overrides: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """(overrides every job shares, each job's remaining overrides): what tells the jobs apart."""
    if len(overrides) < 2:
        return [], [list(o) for o in overrides]
    common = [o for o in overrides[0] if all(o in other for other in overrides[1:])]
    return common, [[o for o in job if o not in common] for job in overrides]


def best_miou(job: JobRecord) -> float | None:
    best = (job.metrics or {}).get("best") or {}
    value = best.get("miou")
    return None if value is None else float(value)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = collect_jobs(sweep_dir)
        print(summary_text(sweep_dir, jobs), flush=True)
        safe_files.write_text(sweep_dir / "sweep_summary.json", dumps(summary_record(jobs), indent=2))


def summary_text(sweep_dir: Path, jobs: list[JobRecord]) -> str:
    ok = sum(job.ok for job in jobs)
    failed = sum(job.status == "FAILED" for job in jobs)
    pruned = sum(job.status == "PRUNED" for job in jobs)
    other = len(jobs) - ok - failed - pruned
    head = f"sweep {sweep_dir}: {len(jobs)} jobs, {ok} ok, {failed} failed"
    if pruned:
        head += f", {pruned} pruned"
    if other:
        head += f", {other} other (stopped or incomplete)"
    _, distinct = varying_overrides([job.overrides for job in jobs])
    lines = [head]
    for job, overrides in zip(jobs, distinct, strict=True):
        miou = best_miou(job)
        detail = f"error: {job.error}" if job.status == "FAILED" else (
            f"best val/miou={miou:.4f}" if miou is not None and not math.isnan(miou) else "no validation")
        status = "ok" if job.ok else job.status
        lines.append(f"  #{job.name:<4} {status:<10} {' '.join(overrides):<40} {detail}")
    lines.append(f"leaderboard: segkit-report {sweep_dir}")
    return "\n".join(lines)


def summary_record(jobs: list[JobRecord]) -> dict[str, Any]:
    return {
        "ok": [job.name for job in jobs if job.ok],
        "failed": [job.name for job in jobs if job.status == "FAILED"],
        "pruned": [job.name for job in jobs if job.status == "PRUNED"],
        "jobs": [{"job": job.name, "status": job.status, "overrides": job.overrides, "error": job.error,
                  "best_miou": best_miou(job)} for job in jobs],
    }
