"""Every part of a training, built from the composed config: `build_parts(cfg, device)`.

The trainer runs the parts, `segkit/benchmark.py` times them, a federated client trains its shard
with them. Everything that can fail on a config value is built before any data is read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3

from segkit.augment import JointAugment
from segkit.config import build
from segkit.data.class_balance import median_frequency_weights
from segkit.data.geometry import TrainingGeometry
from segkit.data.loading import Shard, build_dataset, device_batches
from segkit.data.readers.base import SegmentationDataset
from segkit.engine.distributed import DistContext, wrap_model
from segkit.engine.optim import build_optimizer
from segkit.engine.privacy import (
    PrivateTraining,
    load_privacy_state,
    make_private,
    privacy_state,
    private_model,
    training_batches,
)
from segkit.engine.seeding import seed_everything
from segkit.engine.step import TrainStep, build_grad_scaler, computes_bf16_natively, use_channels_last
from segkit.errors import ConfigError
from segkit.losses import fill_class_weights, needs_class_weights
from segkit.metrics import SegmentationMetrics, build_metrics
from segkit.models import Segmenter

log = logging.getLogger(__name__)


@dataclass
class TrainingParts:
    """What one training is made of; `step` holds the same model, loss, optimizer and scheduler."""

    dist: DistContext
    device: torch.device
    channels_last: bool
    model: Segmenter  # the bare network: checkpoints, validation
    train_module: torch.nn.Module  # the network as trained: DDP-wrapped with several processes
    augment: JointAugment
    geometry: TrainingGeometry  # how training sees images; validation and inference reproduce it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None  # the averaged weights are what gets validated, selected and saved as `model`
    loss_fn: torch.nn.Module
    train_set: Any
    val_set: Any
    train_loader: Any
    val_loader: Any
    metrics: SegmentationMetrics
    step: TrainStep
    private: PrivateTraining | None  # privacy=dp (engine/privacy.py)
    global_batch: int  # samples per loader step over all processes
    total_steps: int  # optimizer steps the run plans (capped by the privacy budget)

    def state_dict(self) -> dict[str, Any]:
        """The weights and optimizer state a checkpoint holds. With EMA, `model` holds the averaged
        weights and `train_model` the raw ones."""
        return {
            "model": (self.ema.module if self.ema is not None else self.model).state_dict(),
            **({"train_model": self.model.state_dict()} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **privacy_state(self.private),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state.get("train_model", state["model"]))
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        load_privacy_state(self.private, state)


def build_parts(cfg: DictConfig, device: torch.device, dist: DistContext | None = None,
                train_indices: Sequence[int] | None = None) -> TrainingParts:
    """The parts of `cfg`'s training on `device` for this process of `dist` (default: the only one).

    `train_indices`: train on these samples of the training split only (a federated client's shard)."""
    dist = dist or DistContext()
    tcfg = cfg.trainer
    if cfg.dataset.get("gpu_decode") and device.type != "cuda":
        raise ConfigError("dataset.gpu_decode", f"nvjpeg needs a CUDA device, training runs on {device}; "
                          "set it to false")
    channels_last = use_channels_last(tcfg.channels_last, device)
    if tcfg.precision == "bf16-mixed" and not computes_bf16_natively(device):
        log.warning("trainer.precision=bf16-mixed: this %s has no native bf16 arithmetic (on a CPU: AVX512-BF16 "
                    "or AMX), so bf16 will train slower than trainer.precision=32", device.type)
    # Rank 0 keeps the single-process random stream; other ranks draw their own augmentations.
    # (Their differently initialised weights are replaced by rank 0's when DDP wraps the model.)
    seed_everything(tcfg.seed + dist.rank, tcfg.deterministic)
    model = build_network(cfg, device, dist, channels_last)
    train_module = wrap_model(model, dist, device, tcfg.sync_batchnorm)
    augment = build(cfg.augmentation, "augmentation").to(device)
    optimizer = build_optimizer(cfg.optimizer, model)
    ema = ModelEmaV3(model, decay=tcfg.ema_decay) if tcfg.ema_decay else None
    scaler = build_grad_scaler(device, tcfg.precision)

    train_set, val_set = build_datasets(cfg.dataset, train_indices)
    train_loader, val_loader = build_loaders(cfg, train_set, val_set, device, dist)
    loss_fn = build_loss(cfg.loss, train_set).to(device)

    steps_per_epoch = max(1, len(train_loader) // tcfg.accumulate_grad_batches)
    total_steps = tcfg.max_steps or tcfg.max_epochs * steps_per_epoch
    private = make_private(cfg, model, optimizer, train_loader, planned_steps=total_steps)
    if private is not None:  # training ends before the step that would spend more than the budget
        optimizer, total_steps = private.optimizer, min(total_steps, private.max_steps)
    scheduler = build(cfg.scheduler, "scheduler")(optimizer, total_steps=total_steps)
    step = TrainStep(
        forward=torch.compile(train_module) if tcfg.compile else train_module, model=model, augment=augment,
        loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=device,
        precision=tcfg.precision, channels_last=channels_last, gradient_clip_val=tcfg.gradient_clip_val,
        private=private,
    )
    metrics = SegmentationMetrics(train_set.num_classes, train_set.ignore_index, train_set.class_names, device,
                                  build_metrics(cfg.get("metrics"), "val", device))
    return TrainingParts(
        dist=dist, device=device, channels_last=channels_last, model=model, train_module=train_module,
        augment=augment, geometry=TrainingGeometry.from_config(cfg), optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, ema=ema, loss_fn=loss_fn, train_set=train_set, val_set=val_set, train_loader=train_loader,
        val_loader=val_loader, metrics=metrics, step=step, private=private,
        # trainer.batch_size is per process: one optimizer step sees batch_size x processes x accumulation.
        global_batch=tcfg.batch_size * dist.world_size, total_steps=total_steps,
    )


def build_network(cfg: DictConfig, device: torch.device, dist: DistContext, channels_last: bool) -> Segmenter:
    """The bare network on `device`, DP-compatible with privacy=dp, in the configured memory layout."""
    model = cast(Segmenter, private_model(cfg, build(cfg.model, "model").to(device), dist))
    if cfg.trainer.activation_checkpointing:
        model.set_grad_checkpointing(True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_datasets(dataset_cfg: DictConfig, train_indices: Sequence[int] | None = None) -> tuple[Any, Any]:
    """The training split (or the shard `train_indices` of it) and the validation split."""
    train_set: SegmentationDataset | Shard = build_dataset(dataset_cfg, "train")
    if train_indices is not None:
        train_set = Shard(train_set, list(train_indices))
    return train_set, build_dataset(dataset_cfg, "val")


def build_loaders(cfg: DictConfig, train_set: Any, val_set: Any, device: torch.device,
                  dist: DistContext) -> tuple[Any, Any]:
    """This process's training and validation batches, arriving on the device: from the device cache, or
    prefetched from the DataLoader (Poisson-sampled training batches with privacy=dp)."""
    tcfg = cfg.trainer
    train_loader = training_batches(cfg, train_set, device, dist)
    val_loader = device_batches(val_set, batch_size=tcfg.val_batch_size or tcfg.batch_size,
                                num_workers=tcfg.num_workers, train=False, seed=tcfg.seed, device=device,
                                rank=dist.rank, world_size=dist.world_size)
    if len(train_loader) == 0:
        raise ConfigError("trainer.batch_size", f"{tcfg.batch_size} x {dist.world_size} process(es) is larger "
                                                f"than the training set ({len(train_set)} samples)")
    return train_loader, val_loader


def build_loss(loss_cfg: DictConfig, train_set: Any) -> torch.nn.Module:
    """The configured loss; `class_weights: auto` becomes median-frequency weights of the training set."""
    plain: object = OmegaConf.to_container(loss_cfg, resolve=True)
    if needs_class_weights(plain):
        weights = median_frequency_weights(class_pixel_counts(train_set))
        log.info("class_weights: auto -> %s", weights)
        plain = fill_class_weights(plain, weights)
    return build(plain, "loss")


def class_pixel_counts(dataset: Any) -> torch.Tensor:
    """Pixels per class over the whole split (ignore excluded), for median-frequency weights."""
    counts = torch.zeros(dataset.num_classes, dtype=torch.int64)
    for index in range(len(dataset)):
        mask = dataset[index][1]
        valid = mask[mask != dataset.ignore_index]
        counts += torch.bincount(valid, minlength=dataset.num_classes)[: dataset.num_classes]
    return counts
