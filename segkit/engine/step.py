"""One training step, and the one path from images to model input.

`TrainStep` is what the trainer runs for every batch, and what `segkit/benchmark.py` times:
`backward` (augment on the device, forward under the configured precision, loss, scaled backward)
and `optimizer_step` (unscale, clip, step, zero the gradients, advance the LR schedule).

The helpers below are the single place that decides, for training, validation, the Predictor
and the benchmark alike: which device (`resolve_device`), which autocast dtype (`autocast`, from
the table `segkit.config.PRECISIONS`), and how images become model input (`to_model_input`:
uint8 -> float in [0, 1], on the device, channels_last where it pays).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from segkit.config import PRECISIONS
from segkit.errors import ConfigError

if TYPE_CHECKING:
    from segkit.engine.privacy import PrivateTraining


def resolve_device(requested: str | torch.device | None = "auto", key: str = "device") -> torch.device:
    """`auto` (or None): CUDA when there is one, else the CPU; otherwise the named device.

    `key` is the config key named when the request cannot be met (trainer.accelerator, device)."""
    if requested is None or str(requested) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(key, f"unknown device {str(requested)!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, "cuda requested but no CUDA device is available")
    return device


def use_channels_last(setting: bool | None, device: torch.device) -> bool:
    """trainer.channels_last: null means on for CUDA (tensor cores like NHWC), off on the CPU, where the gain
    depends on the CPU and the precision (`scripts/benchmark.py precision` measures it; docs/benchmarks.md)."""
    return device.type == "cuda" if setting is None else bool(setting)


def to_model_input(images: torch.Tensor, device: torch.device | None = None,
                   channels_last: bool = False) -> torch.Tensor:
    """Images as the model takes them: float in [0, 1] (uint8 is divided by 255, on the device, where
    it is 4x smaller to move), on `device` when given, in channels_last memory format when asked."""
    if device is not None:
        images = images.to(device, non_blocking=device.type == "cuda")  # to the host it must block
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast region of trainer.precision (`32`: none) on `device`."""
    if precision not in PRECISIONS:
        raise ConfigError("trainer.precision", f"must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=getattr(torch, dtype))


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether bf16 autocast can run faster than fp32 on `device`: a CUDA GPU with bf16 support, or a CPU
    with AVX512-BF16 or AMX (elsewhere oneDNN emulates bf16, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def build_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling. Every precision gets GradScaler's on-device skip of non-finite
    steps (no host sync with fused optimizers); outside fp16 the scale starts at 1 and never grows."""
    if precision == "16-mixed":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**31 - 1)


@dataclass
class TrainStep:
    """The parts one training step uses; the trainer builds them from the config."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # the network as trained: `model`, maybe in DDP / compiled
    model: nn.Module  # the bare network: gradient clipping, checkpoints
    augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # float images, masks
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per optimizer step
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str = "32"
    channels_last: bool = False
    gradient_clip_val: float | None = None
    private: PrivateTraining | None = None  # privacy=dp (engine/privacy.py): per-sample clip + noise

    def autocast(self) -> AbstractContextManager:
        return autocast(self.device, self.precision)

    def backward(self, images: torch.Tensor, masks: torch.Tensor, accumulate: int = 1) -> torch.Tensor:
        """One batch already on the device (uint8 images, integer masks): augment, forward, loss, backward.

        The gradient is the loss / `accumulate`, so `accumulate` batches add up to one step's mean.
        Returns the batch's loss, detached and still on the device (reading it is a host sync)."""
        images, masks = self.augment(to_model_input(images), masks)
        if self.private is not None:  # per-sample gradients of each sample's own loss (fp32; Opacus clips them)
            return self.private.backward(self.loss_fn, images, masks)
        images = to_model_input(images, channels_last=self.channels_last)  # the augmentation may change the layout
        with self.autocast():
            logits = self.forward(images)
        loss = self.loss_fn(logits.float(), masks)
        self.scaler.scale(loss / accumulate).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients (skipped on device when they are not finite) and advance the LR."""
        if self.private is not None:  # DPOptimizer: clip per sample, add noise, step, account
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return
        if self.gradient_clip_val is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.gradient_clip_val)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
