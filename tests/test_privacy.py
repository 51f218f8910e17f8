"""privacy=dp: DP-SGD with Opacus inside segkit's loop — settings refused by key, the budget kept,
epsilon logged and checkpointed, exact resume, per-sample independence, Poisson batches."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
import torch

import segkit
from segkit.config import validate_config
from segkit.engine.privacy import PoissonBatches, epsilon_after, make_model_private_compatible, steps_within_budget
from segkit.engine.trainer import Trainer, fit
from segkit.errors import ConfigError
from segkit.runs.checkpoint import load_checkpoint

from .conftest import one_tensor, read_csv

pytest.importorskip("opacus")

# Cross-entropy: a per-pixel loss, so the per-sample loop is exercised with the cheapest loss.
PRIVATE = ["privacy=dp", "loss=ce", "augmentation=none", "trainer.max_epochs=2"]


@pytest.mark.parametrize(("override", "key"), [
    ("privacy.target_epsilon=0", "privacy.target_epsilon"),
    ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
    ("privacy.target_delta=1.5", "privacy.target_delta"),
    ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
    ("privacy.accountant=moments", "privacy.accountant"),
    ("privacy.noise_multiplier=-0.5", "privacy.noise_multiplier"),
    ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
    ("trainer.precision=bf16-mixed", "trainer.precision"),
    ("trainer.compile=true", "trainer.compile"),
    ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val"),
    ("dataset.cache=device", "dataset.cache"),
])
def test_settings_that_break_dp_are_refused_naming_the_key(compose_cfg, tmp_path, override, key):
    cfg = compose_cfg([*PRIVATE, override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)
        Trainer(cfg, tmp_path)


def test_neither_noise_nor_budget_is_refused(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"privacy\.noise_multiplier"):
        Trainer(compose_cfg([*PRIVATE, "privacy.target_epsilon=null"]), tmp_path)


def test_budget_is_the_last_step_within_the_target():
    sigma, rate, delta, target = 1.0, 0.05, 1e-5, 3.0
    steps = steps_within_budget(1000, sigma, rate, delta, target, "rdp")
    assert 0 < steps < 1000
    assert epsilon_after(steps, sigma, rate, delta, "rdp") <= target < epsilon_after(steps + 1, sigma, rate, delta,
                                                                                     "rdp")


def test_batchnorm_becomes_groupnorm_and_in_place_activations_are_off():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True))
    fixed = make_model_private_compatible(model)
    kinds = [type(m) for m in fixed.modules()]
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.GroupNorm in kinds
    assert all(not getattr(m, "inplace", False) for m in fixed.modules())


def test_a_fixed_noise_run_stops_within_its_budget_and_logs_epsilon(compose_cfg, tmp_path):
    # 16 images, batch 4: q = 0.25, 4 steps per epoch, 12 planned. sigma 1.5 spends epsilon 3 before that.
    cfg = compose_cfg([*PRIVATE, "privacy.noise_multiplier=1.5", "privacy.target_epsilon=3.0",
                       "trainer.max_epochs=3"])
    summary = fit(cfg, tmp_path)
    privacy = summary["privacy"]
    assert 0 < privacy["budget_steps"] < 12 and summary["steps"] == privacy["budget_steps"]
    assert privacy["epsilon"] <= 3.0
    assert privacy["epsilon"] == pytest.approx(epsilon_after(summary["steps"], 1.5, 0.25, 1e-5, "rdp"))
    epsilons = [float(row["privacy/epsilon"]) for row in read_csv(tmp_path / "epochs.csv")]
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(privacy["epsilon"])
    assert json.loads((tmp_path / "metrics.json").read_text())["privacy"]["epsilon"] == privacy["epsilon"]
    stored = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["privacy"]
    assert sum(entry[2] for entry in stored["history"]) == summary["steps"]
    # The DP model (GroupNorm) loads for prediction like any other checkpoint.
    mask = one_tensor(segkit.load(tmp_path / "checkpoints" / "last.pt", device="cpu").predict(torch.rand(3, 32, 32)))
    assert mask.shape == (32, 32)


def test_a_solved_noise_spends_the_target_over_the_planned_steps(compose_cfg, tmp_path):
    summary = fit(compose_cfg([*PRIVATE, "privacy.target_epsilon=2.0"]), tmp_path)
    assert summary["steps"] == 8  # nothing cut: the noise was chosen for exactly these steps
    assert 1.9 <= summary["privacy"]["epsilon"] <= 2.0  # Opacus solves sigma to within its 0.01 tolerance


def test_resume_is_exact_accountant_included(compose_cfg, tmp_path):
    settings = [*PRIVATE, "privacy.target_epsilon=5.0"]
    whole = fit(compose_cfg(settings), tmp_path / "whole")
    stopped = tmp_path / "stopped"
    fit(compose_cfg([*settings, "trainer.stop_after_steps=3"]), stopped)  # mid-epoch 0
    resumed = fit(compose_cfg([*settings, "trainer.resume=auto"]), stopped)
    assert resumed["steps"] == whole["steps"] == 8
    assert resumed["privacy"]["epsilon"] == whole["privacy"]["epsilon"]
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(stopped / "checkpoints" / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_each_sample_gradient_depends_on_that_sample_only(compose_cfg, tmp_path):
    trainer = Trainer(compose_cfg([*PRIVATE, "privacy.target_epsilon=5.0", "loss=ce_dice"]), tmp_path)
    torch.manual_seed(0)
    images, masks = torch.rand(3, 3, 32, 32), torch.randint(0, 4, (3, 32, 32))
    masks[0, :8] = 255  # ignored pixels in one sample: a batch-mean loss would rescale the others
    private = trainer.parts.private
    assert private is not None
    private.backward(trainer.parts.loss_fn, images, masks)
    # grad_sample: the attribute Opacus reads, set on each parameter
    samples: dict[str, Any] = {name: cast(Any, p).grad_sample for name, p in private.parameters.items()}
    first = {name: grads[1].clone() for name, grads in samples.items()}
    images[0], masks[0] = torch.rand(3, 32, 32), torch.randint(0, 4, (32, 32))  # another neighbour
    private.backward(trainer.parts.loss_fn, images, masks)
    samples = {name: cast(Any, p).grad_sample for name, p in private.parameters.items()}
    for name, grads in samples.items():
        assert torch.equal(grads[1], first[name]), name


def test_poisson_batches_replay_an_interrupted_epoch_and_may_be_empty(compose_cfg):
    from segkit.data.loading import build_dataset

    dataset = build_dataset(compose_cfg(["dataset.train_size=8"]).dataset, "train")
    batches = PoissonBatches(dataset, batch_size=1, num_workers=0, seed=3, device=torch.device("cpu"))
    assert len(batches) == 8  # 1 / q steps
    batches.set_epoch(2)
    whole = [masks for _, masks in batches]
    batches.set_epoch(2, start=5)  # 5 steps of batch_size 1 done
    assert len(batches) == 3
    assert all(torch.equal(a, b) for a, b in zip(whole[5:], [m for _, m in batches], strict=True))
    sizes = []
    for epoch in range(4):
        batches.set_epoch(epoch)
        sizes += [len(m) for _, m in batches]
    assert 0 in sizes and max(sizes) > 1  # Poisson: empty and larger batches both occur (q = 1/8)


def test_an_empty_poisson_batch_is_a_noise_only_step(compose_cfg, tmp_path):
    trainer = Trainer(compose_cfg([*PRIVATE, "privacy.target_epsilon=5.0"]), tmp_path)
    before = {k: v.clone() for k, v in trainer.parts.model.state_dict().items()}
    empty = torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, 32, 32, dtype=torch.int64)
    trainer.parts.step.backward(*empty, 1)
    trainer.parts.step.optimizer_step()
    after = trainer.parts.model.state_dict()
    moved = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved  # noise was added
    assert trainer.parts.private is not None and trainer.parts.private.accountant.history  # and the step was accounted
