"""The training loop: plain PyTorch, read top to bottom.

`fit(cfg, output_dir)` trains as configured with per-iteration LR steps and validates every
`trainer.val_every_n_epochs`. The loop's parts are built by `build.py`, validated by `validation.py`,
kept as checkpoints (`last.pt`, `best.pt`, top-k, resume) by `keeper.py` and recorded (`epochs.csv`,
`metrics.json`) by `record.py`; the trackers come from the entry point. Inside the step loop nothing
is read back to the host except every `trainer.log_every_n_steps` steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from segkit import safe_files
from segkit.config import monitor_mode, validate_config
from segkit.engine import validation
from segkit.engine.build import build_parts
from segkit.engine.distributed import (
    DistContext,
    broadcast_from_main,
    gather_objects,
    global_max,
    global_mean,
    global_sum,
    grad_sync,
    init_distributed,
    peer_failures_as_errors,
    shutdown_distributed,
)
from segkit.engine.failures import TrainingDiverged, explain_out_of_memory, stop_on_signals
from segkit.engine.keeper import CheckpointKeeper
from segkit.engine.privacy import privacy_metrics, privacy_summary
from segkit.engine.progress import Progress
from segkit.engine.record import RunRecord, without_confusion
from segkit.engine.run_lock import RunLock
from segkit.engine.seeding import get_rng_state, seed_everything, set_rng_state
from segkit.engine.step import resolve_device
from segkit.engine.threads import HostShare
from segkit.errors import ConfigError
from segkit.losses import WeightedSum
from segkit.reporting.plots import encode_png
from segkit.runs.run_dir import LAST, RunDir
from segkit.trackers.base import Trackers, build_trackers, flatten

log = logging.getLogger(__name__)


# Called after each validation with (epoch, that epoch's record); a returned string stops the run
# (status STOPPED, the string its stop_reason): how a hyperparameter search prunes a trial.
ValidationHook = Callable[[int, dict[str, Any]], str | None]


def fit(cfg: DictConfig, output_dir: str | Path, on_validation: ValidationHook | None = None,
        trackers: Trackers | None = None) -> dict[str, Any]:
    """Train as configured; return the run summary (also written to `metrics.json`).

    `trackers`: where the run is tracked; by default the trackers of the config's `logger` node."""
    validate_config(cfg)
    if trackers is None:
        trackers = build_trackers(cfg.get("logger"))
    run_lock = RunLock()  # taken by the Trainer once it knows the run directory and its rank
    try:
        return Trainer(cfg, Path(output_dir), trackers=trackers, run_lock=run_lock,
                       on_validation=on_validation).fit()
    finally:
        run_lock.release()
        shutdown_distributed()


class EpochMeter:
    """One pass's loss and throughput, summed on the device and read back at logging points only."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.loss_count = torch.zeros((), device=device)
        self.new_window()

    def add(self, loss: torch.Tensor, images: int) -> torch.Tensor:
        """Count a batch's loss if finite; returns whether it was (on the device)."""
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.loss_count += finite
        self.window_images += images
        return finite

    def new_window(self) -> None:
        self.window_start, self.window_images = time.perf_counter(), 0

    def images_per_s(self) -> float:
        return self.window_images / max(time.perf_counter() - self.window_start, 1e-9)

    def mean_loss(self, dist: DistContext) -> float:
        return global_mean(self.loss_sum, self.loss_count, dist)


def peak_memory_stats(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated so far in GiB ({} off CUDA): the figure to watch when raising the crop."""
    if device.type != "cuda":
        return {}
    return {"train/peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


class Trainer:
    """One training run: its parts (`parts`, from build.py), where it is (`epoch`, `global_step`), its
    checkpoints (`keeper`), its record (`record`) and its trackers."""

    def __init__(self, cfg: DictConfig, output_dir: Path, *, trackers: Trackers | None = None,
                 run_lock: RunLock | None = None, on_validation: ValidationHook | None = None,
                 train_indices: Sequence[int] | None = None) -> None:
        """`trackers`: none by default (fit() builds the config's); only the main process tracks.
        `train_indices`: train on these samples of the training split only (a federated client's shard)."""
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.on_validation = on_validation
        # One process, or one of several started by torchrun / submitit (segkit/engine/distributed.py).
        self.dist, self.device = init_distributed(resolve_device(self.tcfg.accelerator, "trainer.accelerator"),
                                                    self.tcfg.dist_timeout_s)
        # After init_distributed: a submitit task learns there how many ranks share its host.
        # Counted among the host's trainings only while fit() runs (HostShare.held), not for being built.
        self.cpu_share = HostShare(self.tcfg.threads, workers=self.tcfg.num_workers)
        self.cpu_share.apply()
        with peer_failures_as_errors(self.dist):
            # Each process's Hydra dates its own run directory; all follow rank 0's.
            self.output_dir = Path(broadcast_from_main(str(output_dir), self.dist))
            # One live run per directory, taken before anything is read or written there (rank 0 holds it).
            # fit() passes the lock; a Trainer built directly (tests, notebooks) takes none.
            if run_lock is not None:
                run_lock.acquire_for_job(self.output_dir, self.dist, "training")
        self.run = RunDir(self.output_dir)  # where every file of the run goes (segkit/runs/run_dir.py)
        self.parts = build_parts(cfg, self.device, self.dist, train_indices)
        self.trackers = trackers if trackers is not None and self.dist.is_main else Trackers({})
        self.keeper = CheckpointKeeper(
            self.run, self.checkpoint_state, monitor=self.tcfg.monitor,
            mode=monitor_mode(self.tcfg.monitor, self.tcfg.monitor_mode), save_top_k=self.tcfg.save_top_k,
            enabled=self.tcfg.save_checkpoints, is_main=self.dist.is_main,
        )
        self.record = RunRecord(self.run, self.dist.is_main)

        # Progress state: with the keeper's ranking, everything needed to continue exactly where a
        # checkpoint left off.
        self.epoch = 0
        self.global_step = 0
        self.samples_done_in_epoch = 0  # over all processes, so a resume may use another process count
        self.shown_validation: dict[str, float] = {}  # the prog_bar metrics of the last validation
        self.bad_steps_in_a_row = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_steps_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self.stop_reason: str | None = None  # set by SIGINT/SIGTERM or stop_after_steps
        self.last_train_stats: dict[str, Any] = {}
        # [step, torch threads] at the start and at each change: float sums split over another number of
        # threads round differently, so the same seed trains to other weights (segkit-reproduce reads this).
        self.threads_by_step: list[list[int]] = []
        resumed_from = self.keeper.resume(self.tcfg.resume, self._restore)
        if resumed_from is not None:
            log.info("resumed from %s at epoch %d, step %d", resumed_from, self.epoch, self.global_step)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds (the keeper writes it); gathers every process's random state."""
        rng_states = gather_objects(get_rng_state(), self.dist)  # every rank's, for an exact same-size resume
        return {
            **self.parts.state_dict(),
            "progress": {"epoch": self.epoch, "global_step": self.global_step,
                         "samples_done_in_epoch": self.samples_done_in_epoch, **self.keeper.ranking()},
            "history": self.record.history,
            "rng": rng_states[0],
            "rng_other_ranks": rng_states[1:],
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "geometry": self.parts.geometry.as_dict(),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.parts.load_state_dict(state)
        progress = state["progress"]
        self.epoch = progress["epoch"]
        self.global_step = progress["global_step"]
        self.samples_done_in_epoch = progress.get("samples_done_in_epoch",
                                                  progress.get("batches_done_in_epoch", 0) * self.tcfg.batch_size)
        self.record.history = list(state.get("history", []))
        rank_states = [state["rng"], *state.get("rng_other_ranks", [])]
        if self.dist.rank < len(rank_states):
            set_rng_state(rank_states[self.dist.rank])
        else:  # more processes than the checkpoint had: a fresh stream, not a replay of this rank's first steps
            seed_everything(self.tcfg.seed + self.dist.rank + self.dist.world_size * self.global_step,
                            self.tcfg.deterministic)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        with self.cpu_share.held() as plan:  # the host's other trainings count this one until it ends
            log.info("torch threads: %d (%s)", plan.threads, plan.reason)
            self.threads_by_step.append([self.global_step, plan.threads])
            return self._run()

    def _run(self) -> dict[str, Any]:
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            safe_files.write_text(self.run.config, OmegaConf.to_yaml(self.cfg, resolve=True))
        params = flatten(cast(dict[str, Any], OmegaConf.to_container(self.cfg, resolve=True)))
        self.trackers.start(self.output_dir, params, {"device": str(self.device), "scored_at": self.tcfg.score_at,
                                                      "torch_threads": str(self.cpu_share.plan.threads)})
        parts = self.parts
        log.info("training %s on %s (%d train / %d val images) for %d steps on %s", type(parts.model.net).__name__,
                 parts.train_set.name, len(parts.train_set), len(parts.val_set), parts.total_steps, self.device)
        status = "FAILED"
        try:
            with stop_on_signals(self._request_stop), peer_failures_as_errors(self.dist):
                stopped = self._loop()
            status = "STOPPED" if stopped else "FINISHED"
        finally:
            # Written (and attached) before the trackers close, also when the run failed.
            summary = self.write_summary(status)
            self.trackers.log_artifact(self.run.metrics)
            self.trackers.finish({"STOPPED": "KILLED"}.get(status, status))
        return summary

    def train_epochs(self, count: int) -> dict[str, Any]:
        """Train `count` epochs without validating, saving or tracking: a federated client's local round."""
        for _ in range(count):
            self._train_epoch()
            self.epoch += 1
            self.samples_done_in_epoch = 0
        return self.last_train_stats

    def _loop(self) -> bool:
        """Returns True when stopped early (a signal, `stop_after_steps`, the validation hook)."""
        while not self._done():
            with self._explain_out_of_memory("training", self.tcfg.batch_size):
                finished_epoch = self._train_epoch()
            if not finished_epoch:
                self.keeper.save(LAST)
                log.warning("stopped (%s) at step %d; continue with trainer.resume=%s",
                            self.stop_reason, self.global_step, self.run.checkpoint(LAST))
                return True
            record: dict[str, Any] = {"epoch": self.epoch, "step": self.global_step, **self.last_train_stats}
            privacy = privacy_metrics(self.parts.private)
            if privacy:
                record.update(privacy)
                self.trackers.log_metrics(privacy, self.global_step)
            hook_stop = None
            if (self.epoch + 1) % self.tcfg.val_every_n_epochs == 0 or self._done(next_epoch=True):
                with self._explain_out_of_memory("validation", self.tcfg.val_batch_size or self.tcfg.batch_size):
                    record.update(self.validate_epoch(record))
                if self.on_validation is not None:  # rank 0 decides, so all processes stop together
                    asked = self.on_validation(self.epoch, record) if self.dist.is_main else None
                    hook_stop = broadcast_from_main(asked, self.dist)
            self.end_epoch(record)
            if hook_stop is not None:
                self.stop_reason = hook_stop
                log.info("stopped: %s", hook_stop)
                return True
            if self._early_stop():
                log.info("early stopping: %s did not improve for %d validations",
                         self.tcfg.monitor, self.keeper.validations_without_improvement)
                break
        return False

    def end_epoch(self, record: dict[str, Any]) -> None:
        """Record the finished epoch and save last.pt; only then prune the checkpoints the ranking dropped."""
        self.record.add_epoch(record)
        self.epoch += 1
        self.samples_done_in_epoch = 0
        self.keeper.save(LAST)
        self.keeper.prune()

    def _explain_out_of_memory(self, stage: str, batch_size: int) -> AbstractContextManager:
        return explain_out_of_memory(self.cfg, self.device, stage, batch_size, lambda: self.global_step)

    def _request_stop(self, reason: str) -> None:
        if self.stop_reason is not None:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        log.warning("%s received: stopping after the current step", reason)
        self.stop_reason = reason

    def _done(self, next_epoch: bool = False) -> bool:
        epoch = self.epoch + 1 if next_epoch else self.epoch
        return self.global_step >= self.parts.total_steps or epoch >= self.tcfg.max_epochs

    def _early_stop(self) -> bool:
        patience = self.tcfg.early_stopping_patience
        return patience is not None and self.keeper.validations_without_improvement >= patience

    # ------------------------------------------------------------------ training
    def _train_epoch(self) -> bool:
        """One pass over the training set (or the rest of it after a resume). False if stopped early."""
        parts, accumulate = self.parts, self.tcfg.accumulate_grad_batches
        parts.model.train()
        # An epoch's trailing batches that do not fill an accumulation window are dropped, never
        # carried into the next epoch: a resumed run (which has no such leftovers) must match.
        parts.optimizer.zero_grad(set_to_none=True)
        parts.train_loader.sampler.set_epoch(self.epoch, start=self.samples_done_in_epoch)
        self._set_loss_epoch()
        meter, progress = EpochMeter(self.device), self._progress_bar()
        stats = {"lr": parts.optimizer.param_groups[0]["lr"]}
        batches = 0  # in this pass; a pass starts on an optimizer-step boundary (resume points are)
        for images, masks in parts.train_loader:
            batches += 1
            with grad_sync(parts.train_module, sync=batches % accumulate == 0):
                loss = parts.step.backward(images, masks, accumulate)
            self._count_batch(meter, loss, images.shape[0])
            progress.advance(1)
            if batches % accumulate:
                continue
            self._optimizer_step()
            at_log_step = self.global_step % self.tcfg.log_every_n_steps == 0
            if at_log_step:
                stats = self._log_window(meter, progress)
            if self.global_step >= parts.total_steps:
                break
            if self._stop_now(at_log_step):
                progress.close()
                return False
        progress.close()
        self._check_bad_steps()
        self.last_train_stats = {**stats, "train/loss": meter.mean_loss(self.dist),
                                 "train/bad_steps": int(global_sum(self.bad_steps_total, self.dist)),
                                 "lr": parts.optimizer.param_groups[0]["lr"]}
        return True

    def _set_loss_epoch(self) -> None:
        """Terms that start later (`loss.from_epoch`) switch on here; logged once, when they start."""
        loss_fn = self.parts.loss_fn
        if not isinstance(loss_fn, WeightedSum):
            return
        before = set(loss_fn.active_terms())
        loss_fn.set_epoch(self.epoch)
        if self.epoch > 0 and set(loss_fn.active_terms()) != before:
            log.info("epoch %d: loss terms %s", self.epoch, "+".join(loss_fn.active_terms()))

    def _progress_bar(self) -> Progress:
        """The pass's bar, advanced past the batches an interrupted epoch already did."""
        done_before = self.samples_done_in_epoch // self.parts.global_batch
        progress = Progress(done_before + len(self.parts.train_loader), f"epoch {self.epoch}",
                            enabled=self.tcfg.progress_bar and self.dist.is_main)
        progress.advance(done_before)
        return progress

    def _count_batch(self, meter: EpochMeter, loss: torch.Tensor, images: int) -> None:
        finite = meter.add(loss, images * self.dist.world_size)
        self.bad_steps_in_a_row = (self.bad_steps_in_a_row + 1) * ~finite  # stays on the device
        self.bad_steps_total += ~finite
        self.samples_done_in_epoch += self.parts.global_batch

    def _optimizer_step(self) -> None:
        self.parts.step.optimizer_step()
        self.global_step += 1
        if self.parts.ema is not None:
            # Decay 0 at the first step (a copy), trainer.ema_decay after: a function of the step, so a
            # resumed run averages exactly as an uninterrupted one.
            self.parts.ema.update(self.parts.model, step=self.global_step)

    def _log_window(self, meter: EpochMeter, progress: Progress) -> dict[str, Any]:
        """The logging step's figures to the trackers and the bar (one host sync per logging window)."""
        images_per_s = meter.images_per_s()
        stats = {
            "train/loss": meter.mean_loss(self.dist),
            "lr": self.parts.optimizer.param_groups[0]["lr"],
            "train/images_per_s": images_per_s,
            "train/bad_steps": int(global_sum(self.bad_steps_total, self.dist)),
            **peak_memory_stats(self.device),
        }
        self._check_bad_steps()
        self.trackers.log_metrics(stats, self.global_step)
        progress.show({**stats, **self.shown_validation})
        changed = self.cpu_share.refresh()  # another training on this host started or ended
        if changed is not None:
            log.info("torch threads: %d (%s)", changed.threads, changed.reason)
            self.threads_by_step.append([self.global_step, changed.threads])
        meter.new_window()
        return stats

    def _stop_now(self, at_log_step: bool) -> bool:
        """Stop now? A single process stops as soon as asked. Several must stop at the same step, and a
        signal reaches each at its own moment: they agree at logging steps and at trainer.stop_after_steps."""
        stop_step = self.tcfg.stop_after_steps == self.global_step
        if self.stop_reason is None and stop_step:
            self.stop_reason = f"trainer.stop_after_steps={self.global_step}"
        if not self.dist.enabled:
            return self.stop_reason is not None
        if not (at_log_step or stop_step):
            return False
        self.stop_reason = next((r for r in gather_objects(self.stop_reason, self.dist) if r is not None), None)
        return self.stop_reason is not None

    def _check_bad_steps(self) -> None:
        """Read the device-side counter (at logging points only) and stop a diverged run.

        With several processes the worst one counts, so all raise together (a NaN on one rank reaches
        every rank's gradients through the all-reduce anyway)."""
        in_a_row = int(global_max(self.bad_steps_in_a_row, self.dist))
        if in_a_row >= self.tcfg.max_bad_steps:
            last = self.run.checkpoint(LAST)
            raise TrainingDiverged(
                f"loss was NaN/Inf for {in_a_row} steps in a row up to step {self.global_step} "
                f"(trainer.max_bad_steps={self.tcfg.max_bad_steps}); last good checkpoint: "
                f"{last if last.is_file() else 'none yet'}; try a lower optimizer.lr or trainer.gradient_clip_val"
            )

    # ------------------------------------------------------------------ validation
    def validate(self, raw: bool = False) -> dict[str, Any]:
        """Metrics and mean loss of the validated weights (segkit/engine/validation.py)."""
        return validation.validate(self.parts, self.tcfg.score_at, raw)

    def validate_epoch(self, train_record: dict[str, Any]) -> dict[str, Any]:
        """Validate, track and rank by trainer.monitor (best.pt, top-k); the epoch's `val/...` values."""
        # With EMA the trained weights are validated too (as timm's train.py does), so every run shows
        # what the average buys: val/miou (EMA) beside val_raw/miou at the same step.
        raw = self.validate(raw=True) if self.parts.ema is not None else None
        result = self.validate()
        values = validation.validation_record(result, raw)
        self.trackers.log_metrics(values, self.global_step)
        self._log_validation_images()
        self.shown_validation = {f"val/{name}": values[f"val/{name}"] for name in self.parts.metrics.prog_bar_names
                                 if f"val/{name}" in values}
        logged = {**train_record, **values}
        score = logged.get(self.tcfg.monitor)
        if score is None:
            raise ConfigError("trainer.monitor", f"{self.tcfg.monitor!r} is not one of {', '.join(logged)}")
        self.record.final = result
        if self.keeper.add_score(score, self.epoch):
            self.record.best = result
        return {**values, "val/scored_at": self.tcfg.score_at}  # epochs.csv says which protocol

    def _log_validation_images(self) -> None:
        """Every trainer.log_images_every_n_val validations: the first trainer.log_images_count validation
        images with prediction, ground truth and errors, to every tracker and <run>/val_images/."""
        every = self.tcfg.log_images_every_n_val
        count = min(self.tcfg.log_images_count, len(self.parts.val_set))
        number = 1 + self.record.validations_done()  # this validation's, also after resume
        if not every or not count or number % every or not self.dist.is_main:
            return
        grid = validation.validation_images(self.parts, count)
        safe_files.write_bytes(self.output_dir / "val_images" / f"step_{self.global_step:07d}.png", encode_png(grid),
                               root=self.output_dir)
        self.trackers.log_image("val/overlays", grid, self.global_step)

    # ------------------------------------------------------------------ the summary
    def write_summary(self, status: str) -> dict[str, Any]:
        """The run summary, written to metrics.json (strict JSON)."""
        keeper = self.keeper
        summary = {
            "status": status,
            "stop_reason": self.stop_reason,
            "bad_steps": int(self.bad_steps_total),
            "monitor": self.tcfg.monitor,
            "monitor_mode": keeper.mode,
            "scored_at": self.tcfg.score_at,
            "best_score": keeper.best_score if math.isfinite(keeper.best_score) else None,
            "best_epoch": keeper.best_epoch,
            "epochs": self.epoch,
            "steps": self.global_step,
            "best": without_confusion(self.record.best),
            "final": without_confusion(self.record.final),
            "class_names": self.parts.train_set.class_names,
            "torch_threads": self.cpu_share.plan.threads,  # the last share, when other trainings came or went
            "torch_threads_by_step": self.threads_by_step,  # of this process (a resumed run: since its resume)
            "top_k": keeper.top_k,
            **privacy_summary(self.parts.private),
        }
        self.record.write_summary(summary)
        if self.record.best is not None:
            log.info("best %s = %.4f at epoch %d", self.tcfg.monitor, keeper.best_score, keeper.best_epoch)
        return summary
