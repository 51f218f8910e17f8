"""The run record: `epochs.csv` (one row per epoch) and `metrics.json` (the run summary, strict JSON)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from segkit import safe_files
from segkit.runs import json
from segkit.runs.run_dir import RunDir


class RunRecord:
    """The epochs so far and the validations the summary names; the main process writes the files."""

    def __init__(self, run: RunDir, is_main: bool) -> None:
        self.run, self.is_main = run, is_main
        self.history: list[dict[str, Any]] = []  # every epoch's record, also those before a resume
        self.best: dict[str, Any] | None = None  # the validation result at the best monitored score
        self.final: dict[str, Any] | None = None  # the last validation result

    def validations_done(self) -> int:
        return sum("val/loss" in record for record in self.history)

    def add_epoch(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.is_main:
            append_row(self.run.epochs_csv, record)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """metrics.json, strict JSON: NaN (a class with no pixels) becomes null."""
        if self.is_main:
            safe_files.write_text(self.run.metrics, json.dumps(summary, indent=2))


def append_row(path: Path, record: dict[str, Any]) -> None:
    """One row per epoch. A column that first appears later (validation every N epochs, metrics added
    on resume) rewrites the file with the wider header, atomically, so every value keeps its name."""
    rows: list[dict[str, Any]] = []
    header: list[str] = []
    if path.exists():  # read as a run record: a regular file, not through a link, bounded in size
        reader = csv.DictReader(io.StringIO(safe_files.read_run_text(path), newline=""))
        header, rows = list(reader.fieldnames or []), list(reader)
    fields = header + [k for k in record if k not in header]
    if fields == header:
        with safe_files.open_append(path, newline="") as handle:
            csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore").writerow(record)
        return
    with safe_files.atomic_write(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([*rows, record])


def without_confusion(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {k: v for k, v in result.items() if k != "confusion_matrix"}
