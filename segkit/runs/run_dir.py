"""The one owner of a run directory's layout: every module that reads or writes a run's files asks here.

    <run>/
      config.yaml            the resolved config, written when training starts
      epochs.csv             one row per epoch: train loss, lr, validation metrics
      metrics.json           the run summary: status, best / final metrics, class names
      failed.json            a sweep job that failed: the error and its overrides
      checkpoints/last.pt    every epoch (and on a stop); last.prev.pt keeps the one before
      checkpoints/best.pt    the best validation score so far
      eval/<name>/           segkit-evaluate's default output for a checkpoint of this run
      .hydra/                Hydra's record: config.yaml (as composed), hydra.yaml, overrides.yaml

A checkpoint names its run: `RunDir.of_checkpoint(<run>/checkpoints/best.pt)` is `<run>`.
No torch here: reports and sweeps read runs without loading it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segkit import safe_files
from segkit.errors import SegkitError

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run a checkpoint belongs to (`<run>/checkpoints/<name>.pt`)."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, name: str = LAST) -> Path:
        return self.checkpoints / name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def epochs_csv(self) -> Path:
        return self.path / "epochs.csv"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def failed(self) -> Path:
        return self.path / "failed.json"

    def eval_dir(self, name: str) -> Path:
        return self.path / "eval" / name

    @property
    def hydra(self) -> Path:
        return self.path / ".hydra"

    @property
    def hydra_config(self) -> Path:
        """The job's config as Hydra composed it (interpolations kept): what segkit-reproduce trains again."""
        return self.hydra / "config.yaml"

    @property
    def hydra_overrides(self) -> Path:
        return self.hydra / "overrides.yaml"

    @property
    def hydra_settings(self) -> Path:
        """hydra.yaml: Hydra's own node, with the group choices of the run."""
        return self.hydra / "hydra.yaml"

    def read_metrics(self) -> dict[str, Any] | None:
        """The run summary, or None when the run has none (yet) or it is unreadable."""
        return read_summary(self.metrics)


def read_summary(path: Path) -> dict[str, Any] | None:
    """A metrics.json as a dict, or None when it is missing, unreadable or not one. The run may be someone
    else's: read as a run record (a regular file, not through a link, bounded), its JSON depth checked before
    json.loads, which would recurse on a deep nest."""
    try:
        text = safe_files.read_run_text(path)
        safe_files.check_json_text(text, path)
        summary = json.loads(text)
    except (OSError, ValueError, SegkitError):
        return None
    return summary if isinstance(summary, dict) else None
