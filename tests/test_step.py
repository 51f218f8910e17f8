"""segkit.engine.step: the training step, the device resolver, the precision table and the model-input path."""

from __future__ import annotations

import copy

import pytest
import torch

from segkit.config import PRECISIONS
from segkit.engine.step import TrainStep, autocast, build_grad_scaler, resolve_device, to_model_input
from segkit.engine.trainer import Trainer
from segkit.errors import ConfigError

CPU = torch.device("cpu")


def test_to_model_input_scales_uint8_and_sets_the_layout():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    out = to_model_input(images, CPU, channels_last=True)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, images.float() / 255)  # the same IEEE division wherever it happens
    assert out.min() >= 0 and out.max() <= 1
    floats = torch.rand(2, 3, 5, 7)
    assert to_model_input(floats) is floats  # float input is already model input
    assert images.dtype == torch.uint8  # the caller's tensor is left alone


def test_resolve_device_names_the_key_it_cannot_meet():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="trainer.accelerator: unknown device 'gpu'"):
        resolve_device("gpu", "trainer.accelerator")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: cuda requested"):
            resolve_device("cuda:0")


def test_every_precision_of_the_table_has_its_autocast_dtype():
    conv = torch.nn.Conv2d(3, 4, 3)
    images = torch.rand(1, 3, 8, 8)
    for precision, dtype in PRECISIONS.items():
        if precision == "16-mixed":
            continue  # float16 autocast is a CUDA feature
        with autocast(CPU, precision):
            out = conv(images)
        assert out.dtype == (torch.float32 if dtype is None else getattr(torch, dtype)), precision
    with pytest.raises(ConfigError, match="trainer.precision"):
        autocast(CPU, "64")


def test_train_step_with_accumulation_equals_one_step_on_the_whole_batch():
    """Two halves with accumulate=2 give the gradient of the whole batch (mean loss), then one SGD step."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    masks = torch.randint(0, 4, (4, 8, 8))

    def make_step(net: torch.nn.Module) -> TrainStep:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        return TrainStep(forward=net, model=net, augment=lambda x, y: (x, y), loss_fn=torch.nn.CrossEntropyLoss(),
                         optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                         scaler=build_grad_scaler(CPU, "32"), device=CPU, gradient_clip_val=None)

    before = [p.detach().clone() for p in model.parameters()]
    whole, halves = copy.deepcopy(model), copy.deepcopy(model)
    step = make_step(whole)
    step.backward(images, masks)
    step.optimizer_step()
    step = make_step(halves)
    for part in (slice(0, 2), slice(2, 4)):
        step.backward(images[part], masks[part], accumulate=2)
    step.optimizer_step()
    assert all(p.grad is None for p in halves.parameters())  # zeroed for the next step
    for a, b, start in zip(whole.parameters(), halves.parameters(), before, strict=True):
        assert not torch.equal(a, start)  # the step moved the weights
        # One mean over 256 pixels vs two halved means over 128: float32 rounding, a few ulps per weight.
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_trainer_validation_and_predictor_share_the_model_input(compose_cfg, tmp_path):
    """The trainer's step and the Predictor take uint8 batches through the same path: same logits."""
    from segkit.inference.predictor import Predictor

    trainer = Trainer(compose_cfg(["trainer.channels_last=true", "augmentation=none"]), tmp_path)
    assert trainer.parts.step.channels_last and trainer.parts.step.forward is trainer.parts.train_module
    images, _ = next(iter(trainer.parts.val_loader))
    trainer.parts.model.eval()
    predictor = Predictor(trainer.parts.model, trainer.cfg, trainer.device)
    assert predictor.channels_last  # the run's setting, as the trainer resolved it
    with torch.no_grad():
        expected = trainer.parts.step.forward(to_model_input(images, channels_last=True))
        assert torch.equal(predictor.logits(images), expected)
