"""The training loop: plain PyTorch, one class, read top to bottom.

`fit(cfg, output_dir)` builds every part from the composed config, trains with per-iteration
LR steps, validates with a confusion matrix (and the loss and the configured metrics) on the device,
keeps `last.pt` / `best.pt` and the top-k checkpoints by `trainer.monitor`, optionally an EMA of the
weights, and writes the run record (`epochs.csv`, `metrics.json`). Inside the step loop nothing is read
back to the host except every `trainer.log_every_n_steps` steps.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3

from segkit.augment import JointAugment
from segkit.config import build, monitor_mode, validate_config
from segkit.data.class_balance import median_frequency_weights
from segkit.data.geometry import TrainingGeometry, restore_logits
from segkit.data.loading import Shard, build_dataset, device_batches
from segkit.engine.distributed import (
    broadcast_from_main,
    gather_objects,
    global_max,
    global_sum,
    grad_sync,
    init_distributed,
    peer_failures_as_errors,
    shutdown_distributed,
    wrap_model,
)
from segkit.engine.optim import build_optimizer
from segkit.engine.privacy import (
    PoissonBatches,
    PrivateTraining,
    check_privacy_config,
    make_model_private_compatible,
)
from segkit.engine.progress import Progress
from segkit.engine.run_lock import RunLock
from segkit.engine.step import (
    TrainStep,
    build_grad_scaler,
    resolve_device,
    to_model_input,
    use_channels_last,
)
from segkit.errors import CheckpointError, ConfigError, SegkitError
from segkit.losses import fill_class_weights, needs_class_weights
from segkit.metrics import SegmentationMetrics, build_metrics, class_scores
from segkit.models import Segmenter
from segkit.models.sliding import slide_logits
from segkit.reporting.plots import comparison_grid, encode_png, stable_palette
from segkit.runs import safe_files
from segkit.runs.checkpoint import load_checkpoint, load_latest_checkpoint, save_checkpoint
from segkit.runs.run_dir import BEST, LAST, RunDir
from segkit.trackers.base import build_trackers, flatten

log = logging.getLogger(__name__)


# Called after each validation with (epoch, that epoch's record); a returned string stops the run
# (status STOPPED, the string its stop_reason): how a hyperparameter search prunes a trial.
ValidationHook = Callable[[int, dict[str, Any]], str | None]


def fit(cfg: DictConfig, output_dir: str | Path, on_validation: ValidationHook | None = None) -> dict[str, Any]:
    """Train as configured; return the run summary (also written to `metrics.json`)."""
    validate_config(cfg)
    run_lock = RunLock()  # taken by the Trainer once it knows the run directory and its rank
    try:
        return Trainer(cfg, Path(output_dir), run_lock=run_lock, on_validation=on_validation).fit()
    finally:
        run_lock.release()
        shutdown_distributed()


class TrainingDiverged(SegkitError):
    """The loss stayed non-finite for trainer.max_bad_steps steps."""


class OutOfMemory(SegkitError):
    """The device ran out of memory; the message names the batch and image sizes and what to change."""


@contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to a graceful stop while training (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
    previous = {sig: signal.signal(sig, lambda num, _frame: request_stop(names[num])) for sig in names}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    # Set both ways: an earlier fit in the same process (a notebook, a test) must not leave it on.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class Trainer:
    def __init__(self, cfg: DictConfig, output_dir: Path, *, run_lock: RunLock | None = None,
                 on_validation: ValidationHook | None = None, train_indices: Sequence[int] | None = None) -> None:
        """`train_indices`: train on these samples of the training split only (a federated client's shard)."""
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.on_validation = on_validation
        # One process, or one of several started by torchrun / submitit (segkit/engine/distributed.py).
        self.dist, self.device = init_distributed(resolve_device(self.tcfg.accelerator, "trainer.accelerator"),
                                                    self.tcfg.dist_timeout_s)
        with peer_failures_as_errors(self.dist):
            # Each process's Hydra dates its own run directory; all follow rank 0's.
            self.output_dir = Path(broadcast_from_main(str(output_dir), self.dist))
            # One live run per directory, taken before anything is read or written there (rank 0 holds it).
            # fit() passes the lock; a Trainer built directly (tests, notebooks) takes none.
            if run_lock is not None:
                run_lock.acquire_for_job(self.output_dir, self.dist, "training")
        self.run = RunDir(self.output_dir)  # where every file of the run goes (segkit/runs/run_dir.py)
        if cfg.dataset.get("gpu_decode") and self.device.type != "cuda":
            raise ConfigError("dataset.gpu_decode", f"nvjpeg needs a CUDA device, training runs on {self.device}; "
                              "set it to false")
        self.channels_last = use_channels_last(self.tcfg.channels_last, self.device)
        # Rank 0 keeps the single-process random stream; other ranks draw their own augmentations.
        # (Their differently initialised weights are replaced by rank 0's when DDP wraps the model.)
        seed_everything(self.tcfg.seed + self.dist.rank, self.tcfg.deterministic)

        # Everything that can fail on a config value is built before any data is read.
        self.model: Segmenter = build(cfg.model, "model").to(self.device)
        if cfg.get("privacy") is not None:  # DP-SGD (engine/privacy.py): refuse what does not combine
            check_privacy_config(cfg)
            if self.dist.enabled:
                raise ConfigError("privacy", "DP-SGD runs in one process; start it without torchrun/submitit tasks")
            self.model = make_model_private_compatible(self.model)
        if self.tcfg.activation_checkpointing:
            self.model.set_grad_checkpointing(True)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # self.model stays the bare network (checkpoints, validation); training goes through DDP.
        self.train_module = wrap_model(self.model, self.dist, self.device, self.tcfg.sync_batchnorm)
        self.augment: JointAugment = build(cfg.augmentation, "augmentation").to(self.device)
        # How training sees images; validation and every inference path reproduce it (the checkpoint records it).
        self.geometry = TrainingGeometry.from_config(cfg)
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        # The exponential moving average of the weights is what gets validated, selected and saved as `model`.
        self.ema = ModelEmaV3(self.model, decay=self.tcfg.ema_decay) if self.tcfg.ema_decay else None
        self.scaler = build_grad_scaler(self.device, self.tcfg.precision)
        self.trackers = build_trackers(cfg.get("logger") if self.dist.is_main else None)  # rank 0 tracks

        self.train_set = build_dataset(cfg.dataset, "train")
        if train_indices is not None:
            self.train_set = Shard(self.train_set, list(train_indices))
        self.val_set = build_dataset(cfg.dataset, "val")
        # Batches arrive on the device: from the device cache, or prefetched from the DataLoader.
        workers = self.tcfg.num_workers
        if cfg.get("privacy") is not None:  # Poisson sampling, which the privacy accountant assumes
            self.train_loader = PoissonBatches(self.train_set, batch_size=self.tcfg.batch_size, num_workers=workers,
                                               seed=self.tcfg.seed, device=self.device)
        else:
            self.train_loader = device_batches(
                self.train_set, batch_size=self.tcfg.batch_size, num_workers=workers, train=True,
                seed=self.tcfg.seed, device=self.device, rank=self.dist.rank, world_size=self.dist.world_size,
            )
        self.val_loader = device_batches(
            self.val_set, batch_size=self.tcfg.val_batch_size or self.tcfg.batch_size, num_workers=workers,
            train=False, seed=self.tcfg.seed, device=self.device, rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        # trainer.batch_size is per process: one optimizer step sees batch_size x processes x accumulation.
        self.global_batch = self.tcfg.batch_size * self.dist.world_size
        if len(self.train_loader) == 0:
            raise ConfigError(
                "trainer.batch_size",
                f"{self.tcfg.batch_size} x {self.dist.world_size} process(es) is larger than the training set "
                f"({len(self.train_set)} samples)",
            )
        self.loss_fn = self._build_loss().to(self.device)

        accumulate = self.tcfg.accumulate_grad_batches
        self.steps_per_epoch = max(1, len(self.train_loader) // accumulate)
        self.total_steps = self.tcfg.max_steps or self.tcfg.max_epochs * self.steps_per_epoch
        self.private: PrivateTraining | None = None
        if cfg.get("privacy") is not None:
            # Opacus wraps the model (per-sample gradients) and the optimizer (clip + noise); training ends
            # before the step that would spend more than privacy.target_epsilon.
            self.private = PrivateTraining(cfg.privacy, self.model, self.optimizer, self.train_loader,
                                           planned_steps=self.total_steps)
            self.optimizer = self.private.optimizer
            self.total_steps = min(self.total_steps, self.private.max_steps)
        self.scheduler = build(cfg.scheduler, "scheduler")(self.optimizer, total_steps=self.total_steps)
        self.step = TrainStep(
            forward=torch.compile(self.train_module) if self.tcfg.compile else self.train_module,
            model=self.model, augment=self.augment, loss_fn=self.loss_fn, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, device=self.device, precision=self.tcfg.precision,
            channels_last=self.channels_last, gradient_clip_val=self.tcfg.gradient_clip_val, private=self.private,
        )
        self.metrics = SegmentationMetrics(
            self.train_set.num_classes, self.train_set.ignore_index, self.train_set.class_names, self.device,
            build_metrics(cfg.get("metrics"), "val", self.device),
        )
        self.monitor_mode = monitor_mode(self.tcfg.monitor, self.tcfg.monitor_mode)

        # Progress state: everything needed to continue exactly where a checkpoint left off.
        self.epoch = 0
        self.global_step = 0
        self.samples_done_in_epoch = 0  # over all processes, so a resume may use another process count
        self.best_score = -math.inf if self.monitor_mode == "max" else math.inf
        self.best_epoch = -1
        self.top_k: list[dict[str, Any]] = []  # best first: {"score", "epoch", "file"} (trainer.save_top_k)
        self.shown_validation: dict[str, float] = {}  # the prog_bar metrics of the last validation
        self.validations_without_improvement = 0
        self.history: list[dict[str, Any]] = []
        self.bad_steps_in_a_row = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_steps_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self.stop_reason: str | None = None  # set by SIGINT/SIGTERM or stop_after_steps
        self._resume()

    # ------------------------------------------------------------------ setup helpers
    def _build_loss(self) -> torch.nn.Module:
        loss_cfg = OmegaConf.to_container(self.cfg.loss, resolve=True)
        if needs_class_weights(loss_cfg):
            weights = median_frequency_weights(class_pixel_counts(self.train_set))
            log.info("class_weights: auto -> %s", weights)
            loss_cfg = fill_class_weights(loss_cfg, weights)
        return build(loss_cfg, "loss")

    def _resume(self) -> None:
        resume = self.tcfg.resume
        if resume is None:
            return
        if resume == "auto":
            found = load_latest_checkpoint(self.run.checkpoints)
            if found is None:
                log.info("trainer.resume=auto: no checkpoint in %s, starting from scratch", self.run.checkpoints)
                return
            path, state = found
        else:
            path = Path(resume)
            state = load_checkpoint(path)
        # Only tensors and plain values come from the file (weights_only); its stored config is never
        # built and no path inside it is used: this run's own config and output_dir stay in charge.
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"{path}: cannot resume from it, it does not fit this run ({reason})") from None
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)

    def _restore(self, state: dict[str, Any]) -> None:
        # With EMA, `model` holds the averaged weights and `train_model` the raw ones.
        self.model.load_state_dict(state.get("train_model", state["model"]))
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        progress = state["progress"]
        self.epoch = progress["epoch"]
        self.global_step = progress["global_step"]
        self.samples_done_in_epoch = progress.get("samples_done_in_epoch",
                                                  progress.get("batches_done_in_epoch", 0) * self.tcfg.batch_size)
        self.best_score = progress["best_score"]
        self.best_epoch = progress["best_epoch"]
        self.validations_without_improvement = progress["validations_without_improvement"]
        self.top_k = list(progress.get("top_k", []))[: self.tcfg.save_top_k or None]  # k may have been lowered
        self._prune_unranked_checkpoints()
        self.history = list(state.get("history", []))
        if self.private is not None:
            self.private.load_state_dict(state["privacy"])
        rank_states = [state["rng"], *state.get("rng_other_ranks", [])]
        if self.dist.rank < len(rank_states):
            set_rng_state(rank_states[self.dist.rank])
        else:  # more processes than the checkpoint had: a fresh stream, not a replay of this rank's first steps
            seed_everything(self.tcfg.seed + self.dist.rank + self.dist.world_size * self.global_step,
                            self.tcfg.deterministic)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            safe_files.write_text(self.run.config, OmegaConf.to_yaml(self.cfg, resolve=True))
        params = flatten(OmegaConf.to_container(self.cfg, resolve=True))
        self.trackers.start(self.output_dir, params, {"device": str(self.device), "scored_at": self.tcfg.score_at})
        log.info(
            "training %s on %s (%d train / %d val images) for %d steps on %s",
            type(self.model.net).__name__, self.train_set.name, len(self.train_set), len(self.val_set),
            self.total_steps, self.device,
        )
        status = "FAILED"
        try:
            with stop_on_signals(self._request_stop), peer_failures_as_errors(self.dist):
                stopped = self._loop()
            status = "STOPPED" if stopped else "FINISHED"
        finally:
            # Written (and attached) before the trackers close, also when the run failed.
            summary = self._write_summary(status)
            self.trackers.log_artifact(self.run.metrics)
            self.trackers.finish({"STOPPED": "KILLED"}.get(status, status))
        return summary

    def train_epochs(self, count: int) -> dict[str, Any]:
        """Train `count` epochs without validating, saving or tracking: a federated client's local round."""
        for _ in range(count):
            self._train_epoch()
            self.epoch += 1
            self.samples_done_in_epoch = 0
        return self._last_train_stats

    def _loop(self) -> bool:
        """Returns True when stopped early by `stop_after_steps`."""
        while not self._done():
            with self._explain_out_of_memory("training", self.tcfg.batch_size):
                finished_epoch = self._train_epoch()
            if not finished_epoch:
                self._save(LAST)
                log.warning("stopped (%s) at step %d; continue with trainer.resume=%s",
                            self.stop_reason, self.global_step, self.run.checkpoint(LAST))
                return True
            epoch_record: dict[str, Any] = {"epoch": self.epoch, "step": self.global_step}
            epoch_record.update(self._last_train_stats)
            hook_stop = None
            if self.private is not None:
                epoch_record["privacy/epsilon"] = self.private.epsilon()
                self.trackers.log_metrics({"privacy/epsilon": epoch_record["privacy/epsilon"]}, self.global_step)
            if (self.epoch + 1) % self.tcfg.val_every_n_epochs == 0 or self._done(next_epoch=True):
                with self._explain_out_of_memory("validation", self.tcfg.val_batch_size or self.tcfg.batch_size):
                    epoch_record.update(self._validate_and_track(epoch_record))
                if self.on_validation is not None:  # rank 0 decides, so all processes stop together
                    asked = self.on_validation(self.epoch, epoch_record) if self.dist.is_main else None
                    hook_stop = broadcast_from_main(asked, self.dist)
            self.history.append(epoch_record)
            self._append_csv(epoch_record)
            self.epoch += 1
            self.samples_done_in_epoch = 0
            self._save(LAST)
            self._prune_unranked_checkpoints()  # only now that last.pt records the new ranking
            if hook_stop is not None:
                self.stop_reason = hook_stop
                log.info("stopped: %s", hook_stop)
                return True
            if self._early_stop():
                log.info("early stopping: %s did not improve for %d validations",
                         self.tcfg.monitor, self.validations_without_improvement)
                break
        return False

    @contextmanager
    def _explain_out_of_memory(self, stage: str, batch_size: int) -> Iterator[None]:
        try:
            yield
        except torch.OutOfMemoryError as error:
            first_line = str(error).splitlines()[0] if str(error) else "out of memory"
            height, width = self.cfg.dataset.image_size
            crop = self.cfg.augmentation.get("crop_size")
            if stage == "training":
                crop_note = f", crop {crop[0]}x{crop[1]}" if crop else ""
                hint = ("a smaller trainer.batch_size with trainer.accumulate_grad_batches to keep the effective "
                        "batch, trainer.precision=bf16-mixed, or a smaller augmentation.crop_size")
            else:
                crop_note = ""
                hint = "a smaller trainer.val_batch_size or trainer.precision=bf16-mixed"
            raise OutOfMemory(
                f"{self.device.type} out of memory in {stage} at step {self.global_step} with batch size "
                f"{batch_size} at image size {height}x{width}{crop_note} ({first_line}); try {hint}"
            ) from None  # dropping the traceback frees the tensors it holds

    def _request_stop(self, reason: str) -> None:
        if self.stop_reason is not None:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        log.warning("%s received: stopping after the current step", reason)
        self.stop_reason = reason

    def _done(self, next_epoch: bool = False) -> bool:
        epoch = self.epoch + 1 if next_epoch else self.epoch
        return self.global_step >= self.total_steps or epoch >= self.tcfg.max_epochs

    def _early_stop(self) -> bool:
        patience = self.tcfg.early_stopping_patience
        return patience is not None and self.validations_without_improvement >= patience

    # ------------------------------------------------------------------ training
    def _train_epoch(self) -> bool:
        """One pass over the training set (or the rest of it after a resume). False if stopped early."""
        self.model.train()
        # An epoch's trailing batches that do not fill an accumulation window are dropped, never
        # carried into the next epoch: a resumed run (which has no such leftovers) must match.
        self.optimizer.zero_grad(set_to_none=True)
        accumulate = self.tcfg.accumulate_grad_batches
        self.train_loader.sampler.set_epoch(self.epoch, start=self.samples_done_in_epoch)
        loss_sum = torch.zeros((), device=self.device)
        loss_count = torch.zeros((), device=self.device)
        window_start, window_images = time.perf_counter(), 0
        done_before = self.samples_done_in_epoch // self.global_batch
        progress = Progress(done_before + len(self.train_loader), f"epoch {self.epoch}",
                            enabled=self.tcfg.progress_bar and self.dist.is_main)
        progress.advance(done_before)
        stats = {"lr": self.optimizer.param_groups[0]["lr"]}
        batches = 0  # in this pass; a pass starts on an optimizer-step boundary (resume points are)
        for images, masks in self.train_loader:
            batches += 1
            with grad_sync(self.train_module, sync=batches % accumulate == 0):
                loss = self.step.backward(images, masks, accumulate)
            finite = torch.isfinite(loss)
            loss_sum += torch.where(finite, loss, 0.0)
            loss_count += finite
            self.bad_steps_in_a_row = (self.bad_steps_in_a_row + 1) * ~finite  # stays on the device
            self.bad_steps_total += ~finite
            window_images += images.shape[0] * self.dist.world_size
            self.samples_done_in_epoch += self.global_batch
            progress.advance(1)
            if batches % accumulate:
                continue
            self.step.optimizer_step()
            self.global_step += 1
            self._update_ema()
            at_log_step = self.global_step % self.tcfg.log_every_n_steps == 0
            if at_log_step:
                elapsed = time.perf_counter() - window_start  # one host sync per logging window
                stats = {
                    "train/loss": self._mean_loss(loss_sum, loss_count),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "train/images_per_s": window_images / max(elapsed, 1e-9),
                    "train/bad_steps": int(global_sum(self.bad_steps_total, self.dist)),
                    **peak_memory_stats(self.device),
                }
                self._check_bad_steps()
                self.trackers.log_metrics(stats, self.global_step)
                progress.show({**stats, **self.shown_validation})
                window_start, window_images = time.perf_counter(), 0
            if self.global_step >= self.total_steps:
                break
            stop_step = self.tcfg.stop_after_steps == self.global_step
            if self.stop_reason is None and stop_step:
                self.stop_reason = f"trainer.stop_after_steps={self.global_step}"
            if self._stop_agreed(at_log_step or stop_step):
                progress.close()
                return False
        progress.close()
        self._check_bad_steps()
        stats["train/loss"] = self._mean_loss(loss_sum, loss_count)
        stats["train/bad_steps"] = int(global_sum(self.bad_steps_total, self.dist))
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self._last_train_stats = stats
        return True

    def _mean_loss(self, loss_sum: torch.Tensor, loss_count: torch.Tensor) -> float:
        """Mean batch loss over all processes (a host sync: logging points only)."""
        totals = global_sum(torch.stack([loss_sum, loss_count.to(loss_sum.dtype)]), self.dist)
        return float(totals[0] / totals[1].clamp_min(1))

    def _stop_agreed(self, sync_point: bool) -> bool:
        """Stop now? A single process stops as soon as asked. Several must stop at the same step, and a
        signal reaches each at its own moment: they agree at logging steps and at trainer.stop_after_steps."""
        if not self.dist.enabled:
            return self.stop_reason is not None
        if not sync_point:
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
    @torch.no_grad()
    def validate(self, raw: bool = False) -> dict[str, Any]:
        """Metrics and mean loss (`loss`) of the validated weights: the EMA ones with trainer.ema_decay,
        unless `raw` asks for the trained ones.

        The model runs on the letterboxed batch as inference does (whole, or sliding windows for a
        crop-trained model); the loss is the training loss on that batch. With trainer.score_at=native
        each image's scores are then resized to its own size and scored against its untouched mask, one
        image at a time (memory stays bounded). The confusion matrix syncs across processes.
        """
        forward = self._validation_forward(raw)
        self.metrics.reset()
        loss_sum = torch.zeros((), device=self.device)
        images_seen = torch.zeros((), device=self.device)
        native = self.tcfg.score_at == "native"
        indices = iter(self.val_loader.sampler)  # the loader's order: sample ids of every batch
        for images, masks in self.val_loader:  # on the device already
            images = to_model_input(images, channels_last=self.channels_last)
            with self.step.autocast():
                # The network's own output (one logit for binary models: the loss takes it as trained), whole or
                # in sliding windows of the training crop.
                window = self.geometry.window
                logits = slide_logits(forward, images, window) if window is not None else forward(images)
            loss_sum += self.loss_fn(logits.float(), masks) * images.shape[0]
            images_seen += images.shape[0]
            if not native:
                self.metrics.update(logits, masks)
                continue
            for scores in logits:
                target = self.val_set.native_mask(next(indices)).to(self.device, non_blocking=True)
                self.metrics.update(restore_logits(scores, target.shape)[None], target[None])
        result = self.metrics.compute()
        result["loss"] = self._mean_loss(loss_sum, images_seen)
        return result

    def _validation_forward(self, raw: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.ema is not None and not raw:
            return self.ema.module  # always in eval mode
        self.model.eval()
        return self.step.forward

    def _validate_and_track(self, train_record: dict[str, Any]) -> dict[str, Any]:
        # With EMA the trained weights are validated too (as timm's train.py does), so every run shows
        # what the average buys: val/miou (EMA) beside val_raw/miou at the same step.
        raw = self.validate(raw=True) if self.ema is not None else None
        result = self.validate()
        record = {
            "val/loss": result["loss"],
            "val/miou": result["miou"],
            "val/mdice": result["mdice"],
            "val/pixel_acc": result["pixel_acc"],
            **{f"val/{key}": value for key, value in result.items() if key.startswith("foreground_")},
            **{f"val/iou_{name}": value for name, value in result["per_class_iou"].items()},
            **{f"val/{name}": value for name, value in result.get("metrics", {}).items()
               if isinstance(value, (int, float))},
            **({"val_raw/loss": raw["loss"], "val_raw/miou": raw["miou"], "val_raw/pixel_acc": raw["pixel_acc"]}
               if raw is not None else {}),
        }
        self.trackers.log_metrics(record, self.global_step)
        self._log_validation_images()
        self.shown_validation = {f"val/{name}": record[f"val/{name}"] for name in self.metrics.prog_bar_names
                                 if f"val/{name}" in record}
        logged = {**train_record, **record}
        score = logged.get(self.tcfg.monitor)
        if score is None:
            raise ConfigError("trainer.monitor", f"{self.tcfg.monitor!r} is not one of {', '.join(logged)}")
        self.last_validation = result
        if self._better(score, self.best_score):
            self.best_score, self.best_epoch = score, self.epoch
            self.validations_without_improvement = 0
            self.best_validation = result
            self._save(BEST)
        else:
            self.validations_without_improvement += 1
        self._keep_top_k(score)
        return {**record, "val/scored_at": self.tcfg.score_at}  # epochs.csv says which protocol

    @torch.no_grad()
    def _log_validation_images(self) -> None:
        """Every trainer.log_images_every_n_val validations: the first trainer.log_images_count validation
        images with prediction, ground truth and errors, to every tracker and <run>/val_images/."""
        every, count = self.tcfg.log_images_every_n_val, min(self.tcfg.log_images_count, len(self.val_set))
        number = 1 + sum("val/loss" in record for record in self.history)  # this validation's, also after resume
        if not every or not count or number % every or not self.dist.is_main:
            return
        images, masks = zip(*(self.val_set[i] for i in range(count)), strict=True)
        model = self.ema.module if self.ema is not None else self.model  # bare: DDP would wait for peers
        model.eval()
        batch = to_model_input(torch.stack(images), self.device, self.channels_last)
        with self.step.autocast():  # as validation sees them: whole, or in windows of the training crop
            window = self.geometry.window
            logits = slide_logits(model, batch, window) if window is not None else model(batch)
        preds = class_scores(logits.float()).argmax(1).cpu()
        palette = stable_palette(self.val_set.num_classes, self.val_set.colors)
        grid = comparison_grid(images, preds, masks, palette, self.val_set.ignore_index)
        safe_files.write_bytes(self.output_dir / "val_images" / f"step_{self.global_step:07d}.png", encode_png(grid),
                               root=self.output_dir)
        self.trackers.log_image("val/overlays", grid, self.global_step)

    # ------------------------------------------------------------------ checkpoint selection and EMA
    def _better(self, score: float, reference: float) -> bool:
        """Strictly better by trainer.monitor_mode; NaN never is."""
        return score > reference if self.monitor_mode == "max" else score < reference

    def _keep_top_k(self, score: float) -> None:
        """Save this validation's weights if they rank among the best trainer.save_top_k. Files that
        fall out of the ranking are deleted after last.pt records the new ranking, so a crash at any
        point leaves a ranking whose files all exist (_prune_unranked_checkpoints removes the rest)."""
        k = self.tcfg.save_top_k
        if k == 0 or not self.tcfg.save_checkpoints or math.isnan(score):
            return
        if len(self.top_k) >= k and not self._better(score, self.top_k[-1]["score"]):
            return
        name = f"epoch={self.epoch:03d}-{self.tcfg.monitor.replace('/', '_')}={score:.4f}.pt"
        entry = {"score": score, "epoch": self.epoch, "file": name}
        # Stable sort: an equal score arriving later ranks below the earlier one.
        ranked = sorted([*self.top_k, entry], key=lambda e: e["score"], reverse=self.monitor_mode == "max")
        self.top_k = ranked[:k]
        if entry in self.top_k:
            self._save(name)

    def _prune_unranked_checkpoints(self) -> None:
        """Delete epoch=*.pt files outside the ranking (none with save_top_k=0: a resume that leaves the
        key out keeps what an earlier run ranked)."""
        if not self.tcfg.save_top_k or not self.dist.is_main or not self.run.checkpoints.is_dir():
            return
        ranked = {entry["file"] for entry in self.top_k}
        for path in self.run.checkpoints.glob("epoch=*.pt"):
            if path.name not in ranked:
                path.unlink(missing_ok=True)

    def _update_ema(self) -> None:
        if self.ema is not None:
            # Decay 0 at the first step (a copy), trainer.ema_decay after: a function of the step, so a
            # resumed run averages exactly as an uninterrupted one.
            self.ema.update(self.model, step=self.global_step)

    # ------------------------------------------------------------------ outputs
    def _save(self, name: str) -> None:
        if not self.tcfg.save_checkpoints:
            return
        rng_states = gather_objects(get_rng_state(), self.dist)  # every rank's, for an exact same-size resume
        if not self.dist.is_main:
            return
        state = {
            "model": (self.ema.module if self.ema is not None else self.model).state_dict(),
            **({"train_model": self.model.state_dict()} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {
                "epoch": self.epoch,
                "global_step": self.global_step,
                "samples_done_in_epoch": self.samples_done_in_epoch,
                "best_score": self.best_score,
                "best_epoch": self.best_epoch,
                "validations_without_improvement": self.validations_without_improvement,
                "top_k": self.top_k,
            },
            "history": self.history,
            "rng": rng_states[0],
            "rng_other_ranks": rng_states[1:],
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            **({"privacy": self.private.state_dict()} if self.private is not None else {}),
            "geometry": self.geometry.as_dict(),
        }
        save_checkpoint(state, self.run.checkpoint(name), keep_previous=name == LAST)

    def _append_csv(self, record: dict[str, Any]) -> None:
        """One row per epoch. A column that first appears later (validation every N epochs, metrics added
        on resume) rewrites the file with the wider header, atomically, so every value keeps its name."""
        if not self.dist.is_main:
            return
        path = self.run.epochs_csv
        rows: list[dict[str, Any]] = []
        header: list[str] = []
        if path.exists():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
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

    def _write_summary(self, status: str) -> dict[str, Any]:
        best = getattr(self, "best_validation", None)
        summary = {
            "status": status,
            "stop_reason": self.stop_reason,
            "bad_steps": int(self.bad_steps_total),
            "monitor": self.tcfg.monitor,
            "monitor_mode": self.monitor_mode,
            "scored_at": self.tcfg.score_at,
            "best_score": self.best_score if math.isfinite(self.best_score) else None,
            "best_epoch": self.best_epoch,
            "epochs": self.epoch,
            "steps": self.global_step,
            "best": _without_confusion(best),
            "final": _without_confusion(getattr(self, "last_validation", None)),
            "class_names": self.train_set.class_names,
            "top_k": self.top_k,
            **({"privacy": self.private.summary()} if self.private is not None else {}),
        }
        if self.dist.is_main:
            safe_files.write_text(self.run.metrics, json.dumps(summary, indent=2))
        if best is not None:
            log.info("best %s = %.4f at epoch %d", self.tcfg.monitor, self.best_score, self.best_epoch)
        return summary


def peak_memory_stats(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated so far in GiB ({} off CUDA): the figure to watch when raising the crop."""
    if device.type != "cuda":
        return {}
    return {"train/peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def class_pixel_counts(dataset) -> torch.Tensor:
    """Pixels per class over the whole split (ignore excluded), for median-frequency weights."""
    counts = torch.zeros(dataset.num_classes, dtype=torch.int64)
    for index in range(len(dataset)):
        mask = dataset[index][1]
        valid = mask[mask != dataset.ignore_index]
        counts += torch.bincount(valid, minlength=dataset.num_classes)[: dataset.num_classes]
    return counts


def get_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _without_confusion(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {k: v for k, v in result.items() if k != "confusion_matrix"}
