"""How a training stops short: signals become a graceful stop; divergence and out-of-memory become
one-line errors that say what to change."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig

from segkit.errors import SegkitError


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
    names: dict[int, str] = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
    previous = {sig: signal.signal(sig, lambda num, _frame: request_stop(names[num])) for sig in names}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def explain_out_of_memory(cfg: DictConfig, device: torch.device, stage: str, batch_size: int,
                          step: Callable[[], int]) -> Iterator[None]:
    """An out-of-memory error in `stage` (training or validation) as OutOfMemory naming the sizes, the step
    (`step()`, read when it happens) and the settings that would fit."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        first_line = str(error).splitlines()[0] if str(error) else "out of memory"
        height, width = cfg.dataset.image_size
        crop = cfg.augmentation.get("crop_size")
        if stage == "training":
            crop_note = f", crop {crop[0]}x{crop[1]}" if crop else ""
            hint = ("a smaller trainer.batch_size with trainer.accumulate_grad_batches to keep the effective "
                    "batch, trainer.precision=bf16-mixed, or a smaller augmentation.crop_size")
        else:
            crop_note = ""
            hint = "a smaller trainer.val_batch_size or trainer.precision=bf16-mixed"
        raise OutOfMemory(
            f"{device.type} out of memory in {stage} at step {step()} with batch size "
            f"{batch_size} at image size {height}x{width}{crop_note} ({first_line}); try {hint}"
        ) from None  # dropping the traceback frees the tensors it holds
