"""Weights & Biases tracker: offline unless WANDB_API_KEY is set; files under `<run dir>/wandb`.

Offline runs can be uploaded later with `wandb sync <run dir>/wandb/offline-run-*`. Jobs of one
sweep share a W&B group (the sweep directory), so the UI can compare them side by side.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from segkit import safe_files
from segkit.extras import require_extras_of
from segkit.registry import register
from segkit.runs.run_dir import BEST, RunDir
from segkit.trackers.base import Tracker
from segkit.trackers.context import hydra_context, run_tags

log = logging.getLogger(__name__)

MAX_GROUP_CHARS = 128
MAX_TAG_CHARS = 64


def wandb_mode(mode: str | None) -> str:
    """Explicit setting, else WANDB_MODE, else online only when an API key is present."""
    if mode:
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


@register("tracker", extra="wandb", requires=("wandb",))
class WandbTracker(Tracker):
    def __init__(self, project: str = "segkit", entity: str | None = None, mode: str | None = None,
                 log_checkpoint: bool = False) -> None:
        require_extras_of("logger.wandb", WandbTracker)
        self.project = project
        self.entity = entity
        self.mode = mode
        self.log_checkpoint = log_checkpoint
        self.run: Any = None
        self.run_dir: Path | None = None

    def start(self, run_dir: Path, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        import wandb

        context = hydra_context()
        meta = run_tags(run_dir, params, tags, context)
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if (self.run_dir / "wandb").exists():  # wandb writes there itself: refuse links planted below it first
            safe_files.refuse_links(self.run_dir / "wandb")
        group = context.sweep_id[-MAX_GROUP_CHARS:] if context.sweep_id else None
        self.run = wandb.init(
            project=self.project, entity=self.entity, name=context.run_name, group=group,
            dir=str(self.run_dir), mode=cast(Any, wandb_mode(self.mode)),  # wandb checks the value job_type="train",
            config={**params, **{f"meta/{k}": v for k, v in meta.items()}},
            tags=[o[:MAX_TAG_CHARS] for o in context.overrides][:20],
            reinit="finish_previous",  # a sweep runs jobs in one process: never log into a stale run
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        self.log_artifact(RunDir(self.run_dir).config)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(image)}, step=step)

    def log_artifact(self, path: Path) -> None:
        path = Path(path).resolve()
        if self.run is None or self.run_dir is None or not path.is_file():
            return
        if self.run_dir not in path.parents:
            log.debug("wandb: %s is outside the run directory; not saved", path)
            return
        if getattr(self.run, "_is_finished", False):
            log.debug("wandb: run already finished; %s stays in the run directory only", path)
            return
        # Files under run.dir are synced with the run (at finish, or by `wandb sync` when offline);
        # a copy avoids wandb.save's symlink warning and survives the run dir being moved.
        target = Path(self.run.dir) / path.relative_to(self.run_dir)
        with open(path, "rb") as source, safe_files.atomic_write(target, "wb", root=self.run.dir) as copy:
            shutil.copyfileobj(source, copy)  # a new file renamed into place: never through a planted link

    def finish(self, status: str) -> None:
        if self.log_checkpoint and self.run_dir is not None:
            self.log_artifact(RunDir(self.run_dir).checkpoint(BEST))
        self.run.summary["status"] = status  # KILLED (stopped to resume later) is not a failure in W&B
        self.run.finish(exit_code=1 if status == "FAILED" else 0)
