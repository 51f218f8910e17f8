"""Differential privacy (DP-SGD) with Opacus, inside segkit's own training loop.

`privacy=dp` turns a run private. Opacus does the work: `ModuleValidator` makes the model
DP-compatible (BatchNorm -> GroupNorm), `DPOptimizer` clips each sample's gradient to
`max_grad_norm` and adds Gaussian noise, its accountant (RDP, PRV or GDP) tracks the privacy
spent, and `UniformWithReplacementSampler` draws Poisson-sampled batches (each sample joins a
batch with probability q = batch_size / N), the sampling the accountant's guarantee assumes.
This module is the glue:

- `check_privacy_config` refuses, naming the key, what does not combine with DP-SGD.
- `PrivateTraining` owns the optimizer wrapper, the accountant and the budget: with
  `target_epsilon` and no `noise_multiplier` the noise is solved for the planned steps; with both,
  training stops at the last step whose epsilon stays within the target.
- `PrivateTraining.backward` computes each sample's gradient of that sample's own loss. A loss
  averaged over the whole batch's pixels (cross-entropy with ignored pixels, Dice over the batch)
  would let one sample's data change another's gradient, which per-sample clipping cannot bound.
  (Opacus' per-layer hooks refuse the in-place residual additions of timm's ResNets, and its vmap
  path the data-dependent branches of smp's losses; DPOptimizer reads `grad_sample` either way.)
- `PoissonBatches` is the training loader: seeded per epoch, so a resumed epoch redraws exactly
  the batches the interrupted one would have drawn.
- The functions at the end are every place where a private run differs from a plain one (the model,
  the training batches, the optimizer, the checkpoint, the epoch record, the summary): the trainer
  calls them unconditionally and nothing else in the engine branches on `privacy`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, default_collate

from segkit.config import PRIVACY_ACCOUNTANTS as ACCOUNTANTS
from segkit.data.loading import device_batches
from segkit.data.readers.base import SegmentationDataset
from segkit.engine.distributed import DistContext
from segkit.errors import ConfigError

log = logging.getLogger(__name__)


def check_privacy_config(cfg: DictConfig) -> None:
    """Refuse, naming the key, settings that are invalid or do not combine with DP-SGD."""
    privacy = cfg.privacy
    if privacy.noise_multiplier is None and privacy.target_epsilon is None:
        raise ConfigError("privacy.noise_multiplier", "set a noise multiplier or privacy.target_epsilon (or both)")
    if privacy.noise_multiplier is not None and privacy.noise_multiplier <= 0:
        raise ConfigError("privacy.noise_multiplier", f"must be > 0, got {privacy.noise_multiplier}")
    if privacy.target_epsilon is not None and privacy.target_epsilon <= 0:
        raise ConfigError("privacy.target_epsilon", f"must be > 0, got {privacy.target_epsilon}")
    if not 0 < privacy.target_delta < 1:
        raise ConfigError("privacy.target_delta", f"must be in (0, 1), got {privacy.target_delta}")
    if privacy.max_grad_norm <= 0:
        raise ConfigError("privacy.max_grad_norm", f"must be > 0, got {privacy.max_grad_norm}")
    if privacy.accountant not in ACCOUNTANTS:
        raise ConfigError("privacy.accountant", f"must be one of {', '.join(ACCOUNTANTS)}; got {privacy.accountant!r}")
    trainer = cfg.trainer
    refusals = {
        "trainer.accumulate_grad_batches": (trainer.accumulate_grad_batches != 1,
                                            "must be 1 with privacy=dp: raise trainer.batch_size instead (Poisson "
                                            "batches are sampled per step)"),
        "trainer.precision": (trainer.precision != "32", "must be 32 with privacy=dp (loss scaling would scale the "
                                                         "per-sample gradients Opacus clips)"),
        "trainer.compile": (trainer.compile, "must be false with privacy=dp (Opacus' per-sample hooks)"),
        "trainer.gradient_clip_val": (trainer.gradient_clip_val is not None,
                                      "must be null with privacy=dp: privacy.max_grad_norm clips every sample"),
        "trainer.sync_batchnorm": (trainer.sync_batchnorm, "must be false with privacy=dp (BatchNorm mixes samples; "
                                                           "it is replaced by GroupNorm)"),
        "dataset.cache": (cfg.dataset.get("cache") == "device",
                          "device is not supported with privacy=dp; use false or true"),
    }
    for key, (refused, why) in refusals.items():
        if refused:
            raise ConfigError(key, why)


def make_model_private_compatible(model: nn.Module) -> nn.Module:
    """Replace what Opacus cannot train privately (BatchNorm -> GroupNorm); name any layer it cannot fix."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    # Opacus' backward hooks see each layer's output; an in-place activation would overwrite it.
    for module in fixed.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        names = "; ".join(str(error).splitlines()[0] for error in errors[:5])
        raise ConfigError("privacy", f"the model has layers Opacus cannot train privately: {names}; "
                                     "pick another model or backbone")
    return fixed


def epsilon_after(steps: int, noise_multiplier: float, sample_rate: float, delta: float, accountant: str) -> float:
    """The epsilon that `steps` DP-SGD steps spend (0 for none)."""
    from opacus.accountants import create_accountant

    if steps <= 0:
        return 0.0
    ledger = create_accountant(accountant)
    ledger.history = [(noise_multiplier, sample_rate, steps)]
    return float(ledger.get_epsilon(delta))


def steps_within_budget(limit: int, noise_multiplier: float, sample_rate: float, delta: float, target: float,
                        accountant: str) -> int:
    """The largest step count <= limit whose epsilon stays <= target (epsilon grows with steps: bisect)."""
    if epsilon_after(limit, noise_multiplier, sample_rate, delta, accountant) <= target:
        return limit
    low, high = 0, limit  # epsilon(low) <= target < epsilon(high)
    while high - low > 1:
        middle = (low + high) // 2
        if epsilon_after(middle, noise_multiplier, sample_rate, delta, accountant) <= target:
            low = middle
        else:
            high = middle
    return low


class PoissonBatches:
    """Poisson-sampled training batches on the device, in the trainer's loader interface.

    Each epoch has round(1 / q) steps; step k of epoch e draws from a generator seeded by (seed, e),
    so `set_epoch(e, start)` replays the epoch and skips the steps already done.
    """

    def __init__(self, dataset: SegmentationDataset, *, batch_size: int, num_workers: int, seed: int,
                 device: torch.device) -> None:
        self.dataset, self.batch_size, self.num_workers, self.seed, self.device = (
            dataset, batch_size, num_workers, seed, device)
        self.sample_rate = batch_size / len(dataset)
        self.steps = max(1, round(1 / self.sample_rate))
        self.sampler = self  # the trainer calls loader.sampler.set_epoch(epoch, start=samples_done)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        # The trainer counts `batch_size` samples per step; a Poisson step has that many in expectation.
        self.epoch, self.start_step = epoch, start // self.batch_size

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from opacus.data_loader import wrap_collate_with_empty
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        sampler = UniformWithReplacementSampler(num_samples=len(self.dataset), sample_rate=self.sample_rate,
                                                generator=generator, steps=self.steps)
        height, width = self.dataset.image_size
        collate = wrap_collate_with_empty(collate_fn=default_collate,
                                          sample_empty_shapes=[(0, 3, height, width), (0, height, width)],
                                          dtypes=[torch.uint8, torch.int64])
        batches = iter(sampler)
        for _ in range(self.start_step):  # the steps an interrupted epoch already took: same draws, skipped
            next(batches)
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which
        # also feeds the noise, and a resumed epoch would then draw other noise than the interrupted one.
        loader = DataLoader(self.dataset, batch_sampler=list(batches), num_workers=self.num_workers,
                            collate_fn=collate, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.seed))
        for images, masks in loader:
            yield images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)


class PrivateTraining:
    """The Opacus side of a private run: wraps the model and optimizer, accounts, enforces the budget."""

    def __init__(self, settings: DictConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 batches: PoissonBatches, planned_steps: int) -> None:
        from opacus.accountants import create_accountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DPOptimizer

        self.delta = float(settings.target_delta)
        self.target_epsilon = settings.target_epsilon
        self.accountant_name = settings.accountant
        self.sample_rate = batches.sample_rate
        if settings.noise_multiplier is None:  # spend exactly the target over the planned steps
            self.noise_multiplier = float(get_noise_multiplier(
                target_epsilon=self.target_epsilon, target_delta=self.delta, sample_rate=self.sample_rate,
                steps=planned_steps, accountant=self.accountant_name))
            self.max_steps = planned_steps
        else:
            self.noise_multiplier = float(settings.noise_multiplier)
            self.max_steps = planned_steps if self.target_epsilon is None else steps_within_budget(
                planned_steps, self.noise_multiplier, self.sample_rate, self.delta, self.target_epsilon,
                self.accountant_name)
        if self.max_steps == 0:
            raise ConfigError("privacy.target_epsilon", f"{self.target_epsilon} is spent before the first step with "
                                                        f"noise_multiplier={self.noise_multiplier}; raise either")
        self.model = model
        self.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=float(settings.max_grad_norm),
                                     expected_batch_size=batches.batch_size, loss_reduction="mean",
                                     secure_mode=bool(settings.secure_mode))
        self.accountant = create_accountant(self.accountant_name)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        log.info("privacy: DP-SGD with noise multiplier %.4f, clipping %.3g, sample rate %.4f, %s accountant; "
                 "%d steps give epsilon %.3f at delta %.1e", self.noise_multiplier, settings.max_grad_norm,
                 self.sample_rate, self.accountant_name, self.max_steps, self.epsilon_at(self.max_steps), self.delta)

    def backward(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                 masks: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients into each parameter's `grad_sample` (what DPOptimizer clips); the mean loss.

        A Poisson batch may be empty: the step still happens (noise only) and is accounted, as in Opacus.
        """
        if images.shape[0] == 0:
            for parameter in self.parameters.values():
                parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))  # type: ignore[attr-defined]
            return torch.zeros((), device=images.device)
        # One sample at a time: exact for any model and loss (smp's losses branch on the data, which vmap
        # refuses), and memory stays at one sample's activations plus the batch's per-sample gradients.
        grads: list[tuple[torch.Tensor, ...]] = []
        losses = []
        for image, mask in zip(images, masks, strict=True):
            loss = loss_fn(self.model(image[None]).float(), mask[None])
            grads.append(torch.autograd.grad(loss, list(self.parameters.values())))
            losses.append(loss.detach())
        for index, parameter in enumerate(self.parameters.values()):
            parameter.grad_sample = torch.stack([sample[index] for sample in grads])  # type: ignore[attr-defined]
        return torch.stack(losses).mean()

    def epsilon(self) -> float:
        """Epsilon spent so far (at target_delta)."""
        return float(self.accountant.get_epsilon(self.delta)) if self.accountant.history else 0.0

    def epsilon_at(self, steps: int) -> float:
        return epsilon_after(steps, self.noise_multiplier, self.sample_rate, self.delta, self.accountant_name)

    def summary(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "accountant": self.accountant_name,
                "target_epsilon": self.target_epsilon, "budget_steps": self.max_steps}

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and floats: loads with torch.load(weights_only=True)."""
        return {"history": [list(entry) for entry in self.accountant.history],
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not math.isclose(state["noise_multiplier"], self.noise_multiplier, rel_tol=1e-9):
            raise ConfigError("privacy", f"the checkpoint was trained with noise multiplier "
                                         f"{state['noise_multiplier']}, this config gives {self.noise_multiplier}; "
                                         "resume with the original privacy settings and trainer.max_epochs")
        self.accountant.history = [tuple(entry) for entry in state["history"]]


# ---------------------------------------------------------------------------------------------- in the trainer


def private_model(cfg: DictConfig, model: nn.Module, dist: DistContext) -> nn.Module:
    """With privacy=dp: refuse what does not combine with DP-SGD, then make the model DP-compatible."""
    if cfg.get("privacy") is None:
        return model
    check_privacy_config(cfg)
    if dist.enabled:
        raise ConfigError("privacy", "DP-SGD runs in one process; start it without torchrun/submitit tasks")
    return make_model_private_compatible(model)


def training_batches(cfg: DictConfig, train_set: SegmentationDataset, device: torch.device,
                     dist: DistContext) -> Any:
    """The training loader on the device: Poisson-sampled with privacy=dp (the accountant assumes it)."""
    tcfg = cfg.trainer
    if cfg.get("privacy") is not None:
        return PoissonBatches(train_set, batch_size=tcfg.batch_size, num_workers=tcfg.num_workers, seed=tcfg.seed,
                              device=device)
    return device_batches(train_set, batch_size=tcfg.batch_size, num_workers=tcfg.num_workers, train=True,
                          seed=tcfg.seed, device=device, rank=dist.rank, world_size=dist.world_size)


def make_private(cfg: DictConfig, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Any,
                 planned_steps: int) -> PrivateTraining | None:
    """With privacy=dp, Opacus wraps the model (per-sample gradients) and the optimizer (clip + noise)."""
    if cfg.get("privacy") is None:
        return None
    return PrivateTraining(cfg.privacy, model, optimizer, batches, planned_steps=planned_steps)


def privacy_state(private: PrivateTraining | None) -> dict[str, Any]:
    """The checkpoint's `privacy` entry (none for a plain run)."""
    return {} if private is None else {"privacy": private.state_dict()}


def load_privacy_state(private: PrivateTraining | None, state: dict[str, Any]) -> None:
    if private is not None:
        private.load_state_dict(state["privacy"])


def privacy_metrics(private: PrivateTraining | None) -> dict[str, float]:
    """The epoch record's privacy/epsilon (none for a plain run)."""
    return {} if private is None else {"privacy/epsilon": private.epsilon()}


def privacy_summary(private: PrivateTraining | None) -> dict[str, Any]:
    """The run summary's `privacy` entry (none for a plain run)."""
    return {} if private is None else {"privacy": private.summary()}
