"""Learning-rate schedules stepped once per optimizer step, with an optional linear warmup.

Built from torch.optim.lr_scheduler parts so their state saves and resumes with torch's own code.
The config gives the shape (`_partial_: true`); the trainer supplies the optimizer and total steps.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    PolynomialLR,
    SequentialLR,
    StepLR,
)

from segkit.config import build
from segkit.errors import ConfigError
from segkit.models.vit import layer_decay_groups
from segkit.registry import register


def _with_warmup(
    optimizer: Optimizer, main: LRScheduler, warmup_steps: int, warmup_start_factor: float
) -> LRScheduler:
    if warmup_steps <= 0:
        return main
    warmup = LinearLR(optimizer, start_factor=warmup_start_factor, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


@register("schedule")
def poly(
    optimizer: Optimizer,
    total_steps: int,
    power: float = 0.9,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.001,
) -> LRScheduler:
    """lr = base_lr * (1 - step / total)^power after the warmup (DeepLab's schedule)."""
    main = PolynomialLR(optimizer, total_iters=max(1, total_steps - warmup_steps), power=power)
    return _with_warmup(optimizer, main, warmup_steps, warmup_start_factor)


@register("schedule")
def cosine(
    optimizer: Optimizer,
    total_steps: int,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.001,
) -> LRScheduler:
    main = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=min_lr)
    return _with_warmup(optimizer, main, warmup_steps, warmup_start_factor)


@register("schedule")
def step(
    optimizer: Optimizer,
    total_steps: int,
    step_size: int = 1000,
    gamma: float = 0.1,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.001,
) -> LRScheduler:
    """lr *= gamma every `step_size` optimizer steps."""
    del total_steps  # a step schedule does not depend on the run length
    main = StepLR(optimizer, step_size=step_size, gamma=gamma)
    return _with_warmup(optimizer, main, warmup_steps, warmup_start_factor)


def build_optimizer(optimizer_cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Instantiate the partial optimizer with two groups: encoder at lr, the rest at lr * head_lr_mult;
    with optimizer.layer_decay, a ViT encoder gets one group per block instead."""
    settings = cast(dict[str, Any], OmegaConf.to_container(optimizer_cfg, resolve=True))
    head_lr_mult = float(settings.pop("head_lr_mult", 1.0))
    layer_decay = settings.pop("layer_decay", None)
    lr = settings["lr"]
    if layer_decay is not None:  # a ViT: one group per block, lr * decay^depth (segkit/models/vit.py)
        if not 0 < float(layer_decay) <= 1:
            raise ConfigError("optimizer.layer_decay", f"must be in (0, 1], got {layer_decay}")
        groups = layer_decay_groups(model, lr, float(layer_decay), lr * head_lr_mult)
    else:
        encoder_ids = {id(p) for p in cast(torch.nn.Module, model.encoder).parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        encoder_params = [p for p in trainable if id(p) in encoder_ids]
        head_params = [p for p in trainable if id(p) not in encoder_ids]
        groups = [{"params": encoder_params, "lr": lr}, {"params": head_params, "lr": lr * head_lr_mult}]
    try:
        return build(settings, "optimizer")([g for g in groups if g["params"]])
    except (ValueError, TypeError) as error:
        raise ConfigError("optimizer", str(error).splitlines()[0]) from None
