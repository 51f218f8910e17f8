"""The checkpoint keeper: `last.pt`, `best.pt` and the top-k by `trainer.monitor`, pruning, resume.

Modelled on timm's `CheckpointSaver`: the trainer hands it each validation's score and it decides
what to write. What a checkpoint holds comes from the `state_of` callable the trainer gives it; the
files are written and read by `segkit.runs.checkpoint`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segkit.errors import CheckpointError
from segkit.runs.checkpoint import load_checkpoint, load_latest_checkpoint, save_checkpoint
from segkit.runs.run_dir import BEST, LAST, RunDir

log = logging.getLogger(__name__)


class CheckpointKeeper:
    """Ranks validation scores and keeps the checkpoint files that match the ranking.

    `state_of()` builds a checkpoint's contents; it is called on every process (it may gather from all
    of them), and only the main process writes. `enabled`: trainer.save_checkpoints.
    """

    def __init__(self, run: RunDir, state_of: Callable[[], dict[str, Any]], *, monitor: str, mode: str,
                 save_top_k: int, enabled: bool, is_main: bool) -> None:
        self.run, self.state_of = run, state_of
        self.monitor, self.mode, self.save_top_k = monitor, mode, save_top_k
        self.enabled, self.is_main = enabled, is_main
        self.best_score = -math.inf if mode == "max" else math.inf
        self.best_epoch = -1
        self.validations_without_improvement = 0
        self.top_k: list[dict[str, Any]] = []  # best first: {"score", "epoch", "file"}

    def better(self, score: float, reference: float) -> bool:
        """Strictly better by the monitor's mode; NaN never is."""
        return score > reference if self.mode == "max" else score < reference

    def add_score(self, score: float, epoch: int) -> bool:
        """Record one validation's score: `best.pt` when it improves, a top-k file when it ranks.
        Returns whether it improved."""
        improved = self.better(score, self.best_score)
        if improved:
            self.best_score, self.best_epoch = score, epoch
            self.validations_without_improvement = 0
            self.save(BEST)
        else:
            self.validations_without_improvement += 1
        self._keep_top_k(score, epoch)
        return improved

    def save(self, name: str) -> None:
        if not self.enabled:
            return
        state = self.state_of()  # on every process: it gathers their random states
        if self.is_main:
            save_checkpoint(state, self.run.checkpoint(name), keep_previous=name == LAST)

    def _keep_top_k(self, score: float, epoch: int) -> None:
        """Save these weights if they rank among the best save_top_k. Files that fall out of the ranking
        are deleted by `prune` once last.pt records the new ranking, so a crash at any point leaves a
        ranking whose files all exist."""
        k = self.save_top_k
        if k == 0 or not self.enabled or math.isnan(score):
            return
        if len(self.top_k) >= k and not self.better(score, self.top_k[-1]["score"]):
            return
        name = f"epoch={epoch:03d}-{self.monitor.replace('/', '_')}={score:.4f}.pt"
        entry = {"score": score, "epoch": epoch, "file": name}
        # Stable sort: an equal score arriving later ranks below the earlier one.
        ranked = sorted([*self.top_k, entry], key=lambda e: e["score"], reverse=self.mode == "max")
        self.top_k = ranked[:k]
        if entry in self.top_k:
            self.save(name)

    def prune(self) -> None:
        """Delete epoch=*.pt files outside the ranking (none with save_top_k=0: a resume that leaves the
        key out keeps what an earlier run ranked)."""
        if not self.save_top_k or not self.is_main or not self.run.checkpoints.is_dir():
            return
        ranked = {entry["file"] for entry in self.top_k}
        for path in self.run.checkpoints.glob("epoch=*.pt"):
            if path.name not in ranked:
                path.unlink(missing_ok=True)

    def ranking(self) -> dict[str, Any]:
        """The keeper's part of a checkpoint's `progress`."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "validations_without_improvement": self.validations_without_improvement, "top_k": self.top_k}

    def resume(self, setting: str | None, restore: Callable[[dict[str, Any]], None]) -> Path | None:
        """trainer.resume: `auto` (the newest checkpoint of the run, if any) or a checkpoint path.

        `restore(state)` puts the trainer back where the checkpoint left off; the keeper takes back its
        ranking. Returns the checkpoint resumed from, None when there was none to resume."""
        if setting is None:
            return None
        if setting == "auto":
            found = load_latest_checkpoint(self.run.checkpoints)
            if found is None:
                log.info("trainer.resume=auto: no checkpoint in %s, starting from scratch", self.run.checkpoints)
                return None
            path, state = found
        else:
            path = Path(setting)
            state = load_checkpoint(path)
        # Only tensors and plain values come from the file (weights_only); its stored config is never
        # built and no path inside it is used: this run's own config and output_dir stay in charge.
        try:
            restore(state)
            self._restore_ranking(state["progress"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"{path}: cannot resume from it, it does not fit this run ({reason})") from None
        self.prune()
        return path

    def _restore_ranking(self, progress: dict[str, Any]) -> None:
        self.best_score = progress["best_score"]
        self.best_epoch = progress["best_epoch"]
        self.validations_without_improvement = progress["validations_without_improvement"]
        self.top_k = list(progress.get("top_k", []))[: self.save_top_k or None]  # k may have been lowered
