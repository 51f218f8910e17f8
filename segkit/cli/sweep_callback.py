"""Hydra callback: after a multirun, list which jobs succeeded and which failed, and why.

Registered in conf/train.yaml under `hydra.callbacks`; also writes `<sweep dir>/sweep_summary.json`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from segkit.cli.common import dumps
from segkit.cli.sweep import JobRecord, best_miou, collect_jobs, varying_overrides


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = collect_jobs(sweep_dir)
        print(summary_text(sweep_dir, jobs), flush=True)
        (sweep_dir / "sweep_summary.json").write_text(dumps(summary_record(jobs), indent=2))


def summary_text(sweep_dir: Path, jobs: list[JobRecord]) -> str:
    ok = sum(job.ok for job in jobs)
    failed = sum(job.status == "FAILED" for job in jobs)
    other = len(jobs) - ok - failed
    head = f"sweep {sweep_dir}: {len(jobs)} jobs, {ok} ok, {failed} failed"
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
        "jobs": [{"job": job.name, "status": job.status, "overrides": job.overrides, "error": job.error,
                  "best_miou": best_miou(job)} for job in jobs],
    }
