"""Experiment trackers behind one small interface; a failing tracker never stops training.

Trackers receive plain Python values (no tensors). The run directory's own record
(`epochs.csv`, `metrics.json`) is written by the trainer whatever trackers are configured.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segkit.registry import register

log = logging.getLogger(__name__)


class Tracker:
    """Base tracker: every method is optional."""

    def start(self, run_dir: Path, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """Called once before training with the flattened config."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars at a global optimizer step."""

    def log_artifact(self, path: Path) -> None:
        """A file produced by the run (config, checkpoint, chart)."""

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 picture at a global step (validation overlays)."""

    def finish(self, status: str) -> None:
        """`status` is FINISHED, FAILED or KILLED."""


@register("tracker")
class ConsoleTracker(Tracker):
    """Prints epoch-level metrics (keys starting with `val/` or `epoch`) as one log line."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if any(key.startswith("val/") for key in metrics):
            shown = {k: v for k, v in metrics.items() if "/iou_" not in k and "/dice_" not in k}
            log.info("step %d: %s", step, "  ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))


class Trackers(Tracker):
    """Fans calls out to several trackers; one that raises is warned about once and dropped."""

    def __init__(self, trackers: Mapping[str, Tracker]) -> None:
        self.active = dict(trackers)

    def _each(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.active.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # noqa: BLE001 - tracking must never kill a training
                log.warning("tracker %s failed in %s (%s); training goes on without it", name, method, error)
                del self.active[name]

    def start(self, run_dir: Path, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self._each("start", run_dir, params, tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._each("log_metrics", metrics, step)

    def log_artifact(self, path: Path) -> None:
        self._each("log_artifact", path)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        self._each("log_image", name, image, step)

    def finish(self, status: str) -> None:
        self._each("finish", status)


def build_trackers(loggers: Mapping[str, Any] | None, skip_broken: bool = False) -> Trackers:
    """The trackers of the config's `logger` node (name -> tracker config; a null entry is switched off).

    A tracker whose config cannot be built is a ConfigError, or with `skip_broken` a warning and the
    run goes on without it (recording a sweep job that already failed must not fail again)."""
    from segkit.config import build

    built: dict[str, Tracker] = {}
    for name, node in (loggers or {}).items():
        if node is None:
            continue
        try:
            built[name] = build(node, f"logger.{name}")
        except Exception as error:
            if not skip_broken:
                raise
            log.warning("tracker %s could not be built (%s)", name, error)
    return Trackers(built)


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return flat


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
