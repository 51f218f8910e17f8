"""TensorBoard tracker: scalars per step and the config as text, in `<run dir>/tensorboard`.

`tensorboard --logdir outputs` then shows every run (and every job of a sweep) side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segkit import safe_files
from segkit.extras import require_extras_of
from segkit.registry import register
from segkit.trackers.base import Tracker
from segkit.trackers.context import hydra_context, run_tags


@register("tracker", extra="tensorboard", requires=("tensorboard",))
class TensorBoardTracker(Tracker):
    def __init__(self, subdir: str = "tensorboard") -> None:
        require_extras_of("logger.tensorboard", TensorBoardTracker)
        self.subdir = subdir
        self.writer: Any = None

    def start(self, run_dir: Path, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(run_dir) / self.subdir
        if log_dir.exists():  # the writer is TensorBoard's own: refuse links planted below its folder first
            safe_files.refuse_links(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        meta = run_tags(run_dir, params, tags, hydra_context())
        self.writer.add_text("config", _table(params), 0)
        self.writer.add_text("run", _table(meta), 0)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(key, value, step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


def _table(values: Mapping[str, Any]) -> str:
    """A markdown table, which TensorBoard's text tab renders."""
    rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in values.items())
    return f"| key | value |\n|---|---|\n{rows}"
