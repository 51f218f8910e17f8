"""`segkit-report SWEEP_DIR` (or `--experiment NAME`): rank every run of a sweep.

Writes `leaderboard.md`, `leaderboard.csv` and `leaderboard_heatmap.png` (best val mIoU by
model x loss) into the sweep directory or `--out`; for a multi-objective Optuna search
(hparams_search=optuna_pareto) also `pareto_front.png` and the non-dominated runs in the markdown.
Runs come from the job directories of a multirun (metrics.json / failed.json / trial.json) or from
an MLflow experiment. The parameter count is read from the run's checkpoint (buffers excluded), so
it is blank when checkpoints were not kept; the time is the span from Hydra writing
`.hydra/config.yaml` to the run's last record.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from segkit import safe_files
from segkit.errors import SegkitError, one_line
from segkit.runs.run_dir import BEST, LAST, RunDir
from segkit.sweeps import JobRecord, best_miou, collect_jobs, varying_overrides

if TYPE_CHECKING:
    from segkit.trackers.mlflow import RunRecord

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Row:
    job: str
    overrides: list[str]
    status: str
    best_miou: float | None = None
    per_class_iou: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    params: int | None = None
    model: str | None = None
    loss: str | None = None
    error: str | None = None
    shown_overrides: list[str] = field(default_factory=list)  # the ones that differ between rows
    objectives: dict[str, float] = field(default_factory=dict)  # a search trial's measured objectives
    directions: dict[str, str] = field(default_factory=dict)  # objective -> maximize | minimize


# ---------------------------------------------------------------------- sources
def rows_from_sweep(sweep_dir: Path) -> list[Row]:
    jobs = collect_jobs(sweep_dir)
    return [_row_from_job(job) for job in jobs]


def _row_from_job(job: JobRecord) -> Row:
    best = (job.metrics or {}).get("best") or {}
    trial = job.trial or {}
    return Row(
        job=job.name, overrides=job.overrides, status=job.status, best_miou=best_miou(job),
        per_class_iou=dict(best.get("per_class_iou") or {}), seconds=job.seconds,
        params=count_parameters(job.path),
        model=job.choices.get("model") or _override(job.overrides, "model"),
        loss=job.choices.get("loss") or _override(job.overrides, "loss"), error=job.error,
        objectives=dict(zip(trial.get("objectives", []), trial.get("values") or [], strict=False)),
        directions=dict(zip(trial.get("objectives", []), trial.get("directions") or [], strict=False)),
    )


def rows_from_mlflow(experiment: str, tracking_uri: str) -> list[Row]:
    from segkit.errors import SegkitError
    from segkit.trackers.mlflow import experiment_runs

    try:
        runs = experiment_runs(experiment, tracking_uri)
    except SegkitError as error:
        raise SystemExit(f"error: {error}") from None
    return [_row_from_run(run) for run in runs]


def _row_from_run(run: RunRecord) -> Row:
    tags, best = run.tags, (run.summary or {}).get("best") or {}
    per_class = dict(best.get("per_class_iou") or {}) or {
        k.removeprefix("val/iou_"): v for k, v in run.metrics.items() if k.startswith("val/iou_")}
    run_dir = Path(tags["run_dir"]) if tags.get("run_dir") else None
    overrides = json.loads(tags.get("overrides", "[]"))
    pruned = tags.get("optuna.state") == "PRUNED"  # a search trial stopped by its pruner (segkit/search.py)
    return Row(
        job=tags.get("optuna.trial") or tags.get("job_num") or run.run_name or run.run_id[:8],
        overrides=overrides, status="PRUNED" if pruned else run.status, best_miou=run.best_miou,
        per_class_iou=per_class, seconds=run.seconds,
        params=count_parameters(run_dir) if run_dir else None,
        model=tags.get("choice.model") or run.params.get("model.arch"),
        loss=tags.get("choice.loss") or _override(overrides, "loss"), error=tags.get("error"),
    )


def _override(overrides: Sequence[str], key: str) -> str | None:
    for item in overrides:
        name, _, value = item.partition("=")
        if name.lstrip("+~") == key:
            return value
    return None


def count_parameters(run_dir: Path) -> int | None:
    """Trainable-size count from checkpoints/best.pt (or last.pt); None without a checkpoint."""
    from segkit.errors import CheckpointError
    from segkit.runs.checkpoint import load_checkpoint

    for name in (BEST, LAST):
        path = RunDir(run_dir).checkpoint(name)
        if path.is_file():
            try:
                state = load_checkpoint(path)["model"]
            except CheckpointError:
                continue
            # Modules reachable under two names (`encoder` and `net.encoder`) share storage: count once.
            unique = {(t.data_ptr(), t.numel()): t for k, t in state.items() if not k.endswith(BUFFER_SUFFIXES)}
            return sum(t.numel() for t in unique.values())
    return None


# ---------------------------------------------------------------------- outputs
def rank(rows: list[Row]) -> list[Row]:
    """Best mIoU first; pruned runs (scores of unfinished trainings) after the finished ones; runs
    without a score (failed, incomplete) last, in job order."""
    _, shown = varying_overrides([r.overrides for r in rows])
    for row, overrides in zip(rows, shown, strict=True):
        row.shown_overrides = overrides
    return sorted(rows, key=lambda r: (not _finite(r.best_miou), r.status == "PRUNED", -(r.best_miou or 0.0)))


# ---------------------------------------------------------------------- accuracy versus cost
def pareto_front(rows: Sequence[Row], directions: dict[str, str]) -> list[Row]:
    """The rows no other row beats on every objective at once (`directions`: name -> maximize/minimize)."""
    signs = {name: 1.0 if way == "maximize" else -1.0 for name, way in directions.items()}
    scored = [r for r in rows if all(_finite(r.objectives.get(name)) for name in signs)]

    def dominates(a: Row, b: Row) -> bool:
        better_or_equal = all(signs[n] * a.objectives[n] >= signs[n] * b.objectives[n] for n in signs)
        return better_or_equal and any(signs[n] * a.objectives[n] > signs[n] * b.objectives[n] for n in signs)

    return [r for r in scored if not any(dominates(other, r) for other in scored)]


def objective_directions(rows: Sequence[Row]) -> dict[str, str]:
    """The objectives the search trials measured, with their directions ({} for a plain sweep)."""
    found: dict[str, str] = {}
    for row in rows:
        found.update({name: way for name, way in row.directions.items() if name not in found})
    return found


def pareto_markdown(front: Sequence[Row], directions: dict[str, str]) -> str:
    arrows = ", ".join(f"{name} {'↑' if way == 'maximize' else '↓'}" for name, way in directions.items())
    lines = ["", f"## Pareto front ({arrows})", "",
             "Non-dominated runs (no other run is at least as good on every objective and better on one): "
             + ", ".join(f"#{md_text(row.job)}" for row in front) + ".", "",
             "| job | " + " | ".join(directions) + " | overrides |", "|" + "---|" * (len(directions) + 2)]
    for row in sorted(front, key=lambda r: -r.objectives[next(iter(directions))]):
        values = [_num(row.objectives[name], 4 if name == "miou" else 2) for name in directions]
        cells = [md_text(row.job), *values, " ".join(md_code(o) for o in row.shown_overrides)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plain_text(function: Any) -> Any:
    """segkit.reporting.plots.plain_text, imported when drawing (segkit-report --help loads no torch)."""

    def drawn(*args: Any, **kwargs: Any) -> Any:
        from segkit.reporting.plots import plain_text

        return plain_text(function)(*args, **kwargs)

    return drawn


@_plain_text
def write_pareto_plot(rows: Sequence[Row], front: Sequence[Row], directions: dict[str, str], path: Path) -> None:
    """mIoU against the first cost objective: every scored trial, the front drawn and labelled."""
    from matplotlib.figure import Figure

    y_name = next(iter(directions))
    x_name = next(name for name in directions if name != y_name)
    scored = [r for r in rows if _finite(r.objectives.get(x_name)) and _finite(r.objectives.get(y_name))]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter([r.objectives[x_name] for r in scored], [r.objectives[y_name] for r in scored], color="lightgrey",
               edgecolor="grey", label="trials")
    line = sorted(front, key=lambda r: r.objectives[x_name])
    ax.plot([r.objectives[x_name] for r in line], [r.objectives[y_name] for r in line], "o-", color="tab:red",
            drawstyle="steps-post", label="Pareto front")
    for row in line:
        ax.annotate(f"#{row.job}", (row.objectives[x_name], row.objectives[y_name]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel({"latency_ms": "inference latency (ms / image)", "params": "parameters"}.get(x_name, x_name))
    ax.set_ylabel("best val mIoU" if y_name == "miou" else y_name)
    ax.legend()
    safe_files.write_with(path, lambda buffer: fig.savefig(buffer, format="png", dpi=120))


def class_names(rows: Sequence[Row]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names.extend(n for n in row.per_class_iou if n not in names)
    return names


def write_csv(rows: Sequence[Row], path: Path) -> None:
    classes = class_names(rows)
    with safe_files.atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "job", "status", "best_val_miou", *[csv_text(f"iou_{c}") for c in classes], "seconds",
                         "params", "model", "loss", "overrides", "error"])
        for i, row in enumerate(rows, 1):
            writer.writerow([i, csv_text(row.job), csv_text(row.status), _num(row.best_miou),
                             *[_num(row.per_class_iou.get(c)) for c in classes], _num(row.seconds, 1),
                             row.params if row.params is not None else "", csv_text(row.model or ""),
                             csv_text(row.loss or ""), csv_text(" ".join(row.overrides)), csv_text(row.error or "")])


def csv_text(value: Any) -> str:
    """A cell a spreadsheet shows as text: one starting with = + - @ (or a tab / carriage return) would be
    read as a formula, so it gets a leading apostrophe."""
    text = str(value)
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


MARKDOWN_SPECIAL = set("\\`*_{}[]<>()#+-.!~&$")  # `|`: escaped per table cell below


def md_text(value: Any) -> str:
    """A name from a file shown as text in Markdown: one line, every special character backslash-escaped
    (no link, image, raw HTML or table cell of its own)."""
    text = " ".join(str(value).split())
    return "".join(f"\\{c}" if c in MARKDOWN_SPECIAL else c for c in text)


def md_code(value: Any) -> str:
    """A name from a file as inline code: fenced by more backticks than it holds, on one line."""
    text = " ".join(str(value).split())
    ticks = "`" * (1 + max((len(part) for part in re.findall(r"`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def markdown(rows: Sequence[Row], source: str) -> str:
    classes = class_names(rows)
    common, _ = varying_overrides([r.overrides for r in rows])
    ok = sum(r.status == "FINISHED" for r in rows)
    failed = sum(r.status == "FAILED" for r in rows)
    pruned = sum(r.status == "PRUNED" for r in rows)
    counts = f"{len(rows)} runs: {ok} ok, {failed} failed" + (f", {pruned} pruned" if pruned else "")
    lines = [f"# Leaderboard: {md_text(source)}", "", counts + "."]
    if common:
        lines += ["", "Common overrides: " + " ".join(md_code(o) for o in common)]
    header = ["rank", "job", "overrides", "status", "best val mIoU", *[f"IoU {md_text(c)}" for c in classes], "time",
              "params", "error"]
    lines += ["", "| " + " | ".join(c.replace("|", "\\|") for c in header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows, 1):
        cells = [str(i), md_text(row.job), " ".join(md_code(o) for o in row.shown_overrides), md_text(row.status),
                 _num(row.best_miou), *[_num(row.per_class_iou.get(c)) for c in classes],
                 _duration(row.seconds), _count(row.params), md_text(row.error or "")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


@_plain_text
def write_heatmap(rows: Sequence[Row], path: Path) -> bool:
    """Best mIoU per (model, loss) cell; False (nothing written) when the runs name no model/loss."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    models = sorted({r.model for r in rows if r.model})
    losses = sorted({r.loss for r in rows if r.loss})
    if not models or not losses:
        return False
    grid = np.full((len(models), len(losses)), np.nan)
    tried = np.zeros_like(grid, dtype=bool)
    for row in rows:
        if row.model in models and row.loss in losses:
            i, j = models.index(row.model), losses.index(row.loss)
            tried[i, j] = True
            if _finite(row.best_miou):
                grid[i, j] = np.fmax(grid[i, j], row.best_miou)
    fig = Figure(figsize=(1.6 * len(losses) + 2.5, 0.7 * len(models) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    vmax = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=max(vmax, 1e-6))
    ax.set_xticks(range(len(losses)), losses)
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("loss")
    ax.set_ylabel("model")
    ax.set_title("best val mIoU")
    for i in range(len(models)):
        for j in range(len(losses)):
            text = f"{grid[i, j]:.3f}" if np.isfinite(grid[i, j]) else ("failed" if tried[i, j] else "")
            color = "white" if np.isfinite(grid[i, j]) and grid[i, j] < 0.6 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=color)
    fig.colorbar(image, ax=ax)
    safe_files.write_with(path, lambda buffer: fig.savefig(buffer, format="png", dpi=120))
    return True


def _finite(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _count(params: int | None) -> str:
    if params is None:
        return ""
    return f"{params / 1e6:.2f} M" if params >= 1e5 else str(params)


# ---------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segkit-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a multirun directory (holds 0/, 1/, ...)")
    parser.add_argument("--experiment", help="an MLflow experiment name (task_name) instead of a sweep dir")
    parser.add_argument("--tracking-uri", help="default: sqlite:///<abs outputs>/mlflow.db")
    parser.add_argument("--out", type=Path, help="default: the sweep dir, or report_<name>/")
    args = parser.parse_args(argv)
    if (args.sweep_dir is None) == (args.experiment is None):
        parser.error("give a sweep directory or --experiment NAME (not both)")
    if args.sweep_dir is not None:
        if not args.sweep_dir.is_dir():
            print(f"error: {args.sweep_dir}: not a directory", file=sys.stderr)
            return 2
        try:
            rows, source = rows_from_sweep(args.sweep_dir), str(args.sweep_dir)
        except SegkitError as error:  # a job's record that is a link, a device, huge, or not plain YAML
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 2
        out = args.out or args.sweep_dir
    else:
        from segkit.trackers.mlflow import default_tracking_uri

        uri = args.tracking_uri or default_tracking_uri("outputs")
        rows, source = rows_from_mlflow(args.experiment, uri), f"MLflow experiment {args.experiment} ({uri})"
        out = args.out or Path(f"report_{args.experiment}")
    if not rows:
        print(f"error: no runs found in {source}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    rows = rank(rows)
    try:
        return _write_outputs(rows, source, out)
    except SegkitError as error:  # a leaderboard file that is a planted link
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2


def _write_outputs(rows: list[Row], source: str, out: Path) -> int:
    write_csv(rows, out / "leaderboard.csv")
    text = markdown(rows, source)
    safe_files.write_text(out / "leaderboard.md", text)
    written = ["leaderboard.md", "leaderboard.csv"]
    if write_heatmap(rows, out / "leaderboard_heatmap.png"):
        written.append("leaderboard_heatmap.png")
    directions = objective_directions(rows)
    if len(directions) > 1:
        front = pareto_front(rows, directions)
        text += pareto_markdown(front, directions)
        safe_files.write_text(out / "leaderboard.md", text)
        write_pareto_plot(rows, front, directions, out / "pareto_front.png")
        written.append("pareto_front.png")
    print(text)
    print("wrote " + ", ".join(str(out / name) for name in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
