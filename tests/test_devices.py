"""The training path on every device: the same tests on the CPU (always) and on CUDA (when there is one).

Each test takes the `device` fixture (tests/conftest.py): "cpu", and "cuda" marked `cuda` and skipped without a
CUDA device, so `pytest` on the CPU runs them all and `pytest -m cuda` on a GPU runs the very same tests there
(SEGKIT_TEST_DEVICES=cuda runs only the CUDA variants). What only CUDA has (nvjpeg, memory statistics and
out-of-memory, NCCL, sync-debug mode) is in tests/test_cuda.py.
Tolerances compare two computations of one function; each says what arithmetic bounds it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import kornia.augmentation as K
import pytest
import torch
from torch.overrides import TorchFunctionMode

from segkit.augment import JointAugment
from segkit.config import PRECISIONS, build
from segkit.data.loading import DeviceCachedBatches, DevicePrefetcher, EpochSampler, build_dataset, build_loader
from segkit.engine.step import autocast, build_grad_scaler
from segkit.engine.trainer import Trainer, fit
from segkit.runs.checkpoint import load_checkpoint

# cuBLAS picks reduction orders per call unless given a fixed workspace; read when its handle is first made.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

PRECISION_LIST = list(PRECISIONS)  # "32", "16-mixed", "bf16-mixed": the one table (segkit/config.py)
IGNORE = 255


def on(device: torch.device, *overrides: str) -> list[str]:
    return [f"trainer.accelerator={device.type}", *overrides]


# ---------------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", PRECISION_LIST)
def test_every_precision_autocasts_to_its_dtype_and_scales_the_loss_on_the_device(device, precision):
    conv = torch.nn.Conv2d(3, 4, 3).to(device)
    with autocast(device, precision):
        out = conv(torch.rand(1, 3, 8, 8, device=device))
    dtype = PRECISIONS[precision]
    assert out.device.type == device.type
    assert out.dtype == (torch.float32 if dtype is None else getattr(torch, dtype))
    scaler = build_grad_scaler(device, precision)
    loss = out.float().square().mean()
    scaled = scaler.scale(loss)
    assert scaled.device.type == device.type
    # fp16 multiplies by 2^16 (a power of two: exact); the others keep the scale at 1.
    assert scaled.item() == loss.item() * (2.0**16 if precision == "16-mixed" else 1.0)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_of(compose_cfg, tmp_path, monkeypatch, caplog, native):
    """oneDNN runs bf16 natively only with AVX512-BF16 or AMX; elsewhere bf16 autocast is slower than fp32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cfg = compose_cfg(["trainer.accelerator=cpu", "trainer.precision=bf16-mixed"])
    with caplog.at_level("WARNING", logger="segkit"):
        Trainer(cfg, tmp_path / "run")
    warned = "no native bf16 arithmetic (on a CPU: AVX512-BF16 or AMX)" in caplog.text
    assert warned != native


class HostReads(TorchFunctionMode):
    """Records every read of a tensor's value into Python (`item`, `bool`, `float`, `tolist`, `.cpu()`...):
    on CUDA each is a host sync. torch.cuda's sync-debug mode sees them too, but only on a GPU; this sees the
    Python-level ones on any device."""

    READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_reads() -> Iterator[None]:
    reads = HostReads()
    with reads:
        yield
    assert reads.calls == [], f"read back to the host: {reads.calls}"


def test_the_host_read_detector_sees_a_read():
    reads = HostReads()
    with reads:
        torch.ones(2).sum().item()
        bool(torch.ones(()) > 0)
    assert reads.calls == ["item", "__bool__"]


@pytest.mark.parametrize("precision", PRECISION_LIST)
def test_an_injected_inf_is_skipped_on_the_device_without_a_host_read(compose_cfg, tmp_path, device, precision):
    trainer = Trainer(compose_cfg(on(device, f"trainer.precision={precision}")), tmp_path)
    poison = torch.ones((), device=trainer.parts.device)
    loss_fn = trainer.parts.step.loss_fn
    # The step only calls its loss: a poisoned function stands in for the loss Module.
    step = dataclasses.replace(trainer.parts.step,
                               loss_fn=lambda logits, masks: loss_fn(logits, masks) * poison)  # type: ignore[arg-type]
    images, masks = next(iter(trainer.parts.train_loader))
    assert images.device.type == masks.device.type == device.type
    before = [p.detach().clone() for p in trainer.parts.model.parameters()]
    scale = step.scaler.get_scale()  # a host read, before the checked region

    poison.fill_(float("inf"))
    assert not torch.isfinite(step.backward(images, masks))
    assert not all(torch.isfinite(p.grad).all() for p in trainer.parts.model.parameters() if p.grad is not None)
    with no_host_reads():
        step.optimizer_step()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.parts.model.parameters(), strict=True))  # skipped
    assert all(p.grad is None for p in trainer.parts.model.parameters())  # zeroed for the next step
    assert step.scaler.get_scale() == scale * 0.5  # backed off on the device (exact: a power of two)
    assert trainer.parts.scheduler.last_epoch == 1  # the schedule still advanced: steps count, skipped or not

    poison.fill_(1.0)  # a finite step right after still trains
    assert torch.isfinite(step.backward(images, masks))
    with no_host_reads():
        step.optimizer_step()
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.parts.model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.parts.model.parameters())


@pytest.mark.parametrize("precision", PRECISION_LIST)
def test_each_precision_trains_and_resumes_exactly(compose_cfg, tmp_path, device, precision):
    """Stopped mid-epoch 1 and resumed: bit for bit the uninterrupted run (weights, optimizer, loss scale).

    Deterministic mode, channels_last and Kornia augmentation on the device; U-Net (no bilinear upsampling or
    adaptive pooling, whose CUDA backward kernels add with atomics in a varying order)."""
    common = on(device, f"trainer.precision={precision}", "trainer.max_epochs=2", "trainer.deterministic=true",
                "trainer.channels_last=true", "augmentation=default", "model=unet")  # 4 steps per epoch
    straight = fit(compose_cfg(common), tmp_path / "straight")
    stopped = fit(compose_cfg([*common, "trainer.stop_after_steps=6"]), tmp_path / "split")
    assert stopped["status"] == "STOPPED" and stopped["steps"] == 6
    resumed = fit(compose_cfg([*common, "trainer.resume=auto"]), tmp_path / "split")

    assert straight["status"] == resumed["status"] == "FINISHED"
    assert straight["steps"] == resumed["steps"] == 8 and straight["bad_steps"] == resumed["bad_steps"] == 0
    assert 0 <= straight["final"]["miou"] <= 1
    assert resumed["final"]["miou"] == straight["final"]["miou"]  # integer confusion counts of equal weights
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "split/checkpoints/last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for name in group_a:
            assert torch.equal(group_a[name], group_b[name]), name
    assert a["scaler"] == b["scaler"]


# ---------------------------------------------------------------------------- the input path
def test_prefetcher_yields_the_loaders_batches_on_the_device(compose_cfg, device):
    dataset = build_dataset(compose_cfg(["dataset.train_size=12"]).dataset, "train")
    reference = build_loader(dataset, batch_size=4, num_workers=0, train=True, seed=3, pin_memory=False)
    loader = build_loader(dataset, batch_size=4, num_workers=1, train=True, seed=3,
                          pin_memory=device.type == "cuda")
    prefetcher = DevicePrefetcher(loader, device)
    assert prefetcher.sampler is loader.sampler and len(prefetcher) == len(reference) == 3
    assert isinstance(reference.sampler, EpochSampler) and isinstance(prefetcher.sampler, EpochSampler)
    for epoch in (0, 1):
        reference.sampler.set_epoch(epoch)
        prefetcher.sampler.set_epoch(epoch)
        # Work on each batch while the next one is copied (on CUDA on a side stream: a missing stream wait
        # would read a half-copied batch).
        sums = [(images.float().sum(dim=(1, 2, 3)), masks.sum(dim=(1, 2)), images.device, masks.dtype)
                for images, masks in prefetcher]
        expected = [(images.float().sum(dim=(1, 2, 3)), masks.sum(dim=(1, 2))) for images, masks in reference]
        assert len(sums) == len(expected)
        for (image_sum, mask_sum, on_device, mask_dtype), (image_ref, mask_ref) in zip(sums, expected, strict=True):
            assert on_device.type == device.type and mask_dtype == torch.int64
            assert torch.equal(image_sum.cpu(), image_ref) and torch.equal(mask_sum.cpu(), mask_ref)


@pytest.mark.parametrize("train", [True, False])
def test_device_cache_yields_the_dataloader_batches_in_order(compose_cfg, device, train):
    cfg = compose_cfg(["dataset.train_size=11", "dataset.val_size=11"])
    split = "train" if train else "val"
    plain = build_loader(build_dataset(cfg.dataset, split), batch_size=4, num_workers=0, train=train, seed=3,
                         pin_memory=False)
    cfg.dataset.cache = "device"
    cached = DeviceCachedBatches(build_dataset(cfg.dataset, split), EpochSampler(11, shuffle=train, seed=3),
                                 batch_size=4, drop_last=train, device=device, num_workers=1)
    assert cached.images.device.type == device.type and isinstance(plain.sampler, EpochSampler)
    for epoch, start in ((0, 0), (1, 0), (1, 4)):  # start: the samples a resumed epoch skips
        plain.sampler.set_epoch(epoch, start=start)
        cached.sampler.set_epoch(epoch, start=start)
        expected, got = list(plain), list(cached)
        assert len(got) == len(expected) > 0
        for (image_a, mask_a), (image_b, mask_b) in zip(expected, got, strict=True):
            assert image_b.device.type == device.type and mask_b.dtype == torch.int64
            assert torch.equal(image_a, image_b.cpu()) and torch.equal(mask_a, mask_b.cpu())


def test_training_from_the_device_cache_resumes_on_exactly_the_remaining_batches(compose_cfg, tmp_path, device):
    common = on(device, "dataset.cache=device", "trainer.max_epochs=2")  # 4 steps per epoch
    stopped = fit(compose_cfg([*common, "trainer.stop_after_steps=6"]), tmp_path / "split")  # mid-epoch 1
    assert stopped["status"] == "STOPPED"
    resumed = Trainer(compose_cfg([*common, "trainer.resume=auto"]), tmp_path / "split")
    assert (resumed.epoch, resumed.global_step, resumed.samples_done_in_epoch) == (1, 6, 8)
    resumed.parts.train_loader.sampler.set_epoch(resumed.epoch, start=resumed.samples_done_in_epoch)
    uninterrupted = Trainer(compose_cfg(common), tmp_path / "straight")
    uninterrupted.parts.train_loader.sampler.set_epoch(1)
    expected = list(uninterrupted.parts.train_loader)[2:]  # the two batches epoch 1 had left after step 6
    got = list(resumed.parts.train_loader)
    assert len(got) == len(expected) == 2
    for (image_a, mask_a), (image_b, mask_b) in zip(expected, got, strict=True):
        assert image_b.device.type == device.type
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    assert resumed.fit()["status"] == "FINISHED"


# ---------------------------------------------------------------------------- augmentation on the device
@pytest.mark.parametrize("precision", PRECISION_LIST)
def test_augmentation_on_the_device_keeps_labels_exact_under_each_precision(device, precision):
    """Kornia on the training device, inside the step's autocast region: invented pixels are ignore (never class 0),
    nearest resampling blends no labels, large ids survive fp16/bf16 (a 8-11 bit mantissa), images stay float32."""
    torch.manual_seed(0)
    classes = (1, 7, 200, 253)
    augment = JointAugment([K.RandomAffine(degrees=45, scale=(0.5, 0.6), p=1.0), K.RandomHorizontalFlip(p=0.5)],
                           IGNORE, crop_size=[32, 32]).to(device)
    masks = torch.tensor(classes, device=device).repeat_interleave(10)[None, :, None].expand(4, 40, 40).long()
    images = torch.rand(4, 3, 40, 40, device=device)
    with autocast(device, precision):
        out_images, out = augment(images, masks)
    assert out_images.device.type == out.device.type == device.type
    assert out.dtype == torch.int64 and out_images.dtype == torch.float32 and out.shape == (4, 32, 32)
    assert (out == IGNORE).any() and not (out == 0).any()  # the zoomed-out border was invented
    assert set(out.unique().tolist()) <= {*classes, IGNORE}


# ---------------------------------------------------------------------------- memory format and compilation
# Last in the file: torch.compile is the slowest test, and a GPU check stopped at its time limit keeps the rest.
def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ in float64; NaN or Inf never passes."""
    got, expected = got.double().cpu(), expected.double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_as_accurate_as_eager(variant: torch.Tensor, eager: torch.Tensor, float64: torch.Tensor) -> None:
    """`variant` is as close to the float64 result as the eager float32 computation is, within a factor of 10.

    Two float32 computations of one function may round differently (other conv algorithms, fused kernels, other
    vector widths: AVX-512 or AVX2 on the CPU), and gradients through BatchNorm's mean subtraction cancel, so
    even eager float32 is ~1e-3 off float64 there while the logits are ~1e-5 off. Ten times the eager error (at
    least 1e-4) leaves room for another rounding order; a wrong layout, a missed sync or a miscompiled op is O(1).
    """
    assert variant.shape == eager.shape == float64.shape
    bound = max(10 * relative_error(eager, float64), 1e-4)
    assert relative_error(variant, float64) <= bound


@pytest.fixture
def exact_float32():
    """Convolutions and matmuls in full float32 (not TF32 on CUDA), so two orders of one sum differ by rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def forward_backward(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and every parameter's gradient as one vector. Compared as one vector: some gradients are zero in
    exact arithmetic (a conv bias before BatchNorm), so their own relative error would be rounding noise over 0."""
    model.zero_grad(set_to_none=True)
    logits = model(images)
    logits.float().square().mean().backward()
    grads = torch.cat([p.grad.detach().flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach().float(), grads


@pytest.mark.parametrize("variant", ["channels_last", pytest.param("compile", marks=pytest.mark.slow)])
def test_channels_last_and_compile_give_the_eager_result(compose_cfg, exact_float32, device, variant):
    torch.manual_seed(0)
    eager = build(compose_cfg().model, "model").to(device)  # U-Net on timm's small test ResNet: compiles fast
    other, reference = copy.deepcopy(eager), copy.deepcopy(eager).double()
    images = torch.rand(2, 3, 64, 96, device=device)
    eager_logits, eager_grads = forward_backward(eager, images)
    float64_logits, float64_grads = forward_backward(reference, images.double())
    if variant == "channels_last":
        other = other.to(memory_format=torch.channels_last)
        logits, grads = forward_backward(other, images.contiguous(memory_format=torch.channels_last))
    else:
        # Inductor on the GPU. On the CPU, inductor's C++ code generation takes minutes on 2 cores, so the CPU
        # run checks graph capture and the functionalized graph (aot_eager), which is where a compiled model
        # can diverge from eager; the GPU run checks the generated kernels as well.
        backend = "inductor" if device.type == "cuda" else "aot_eager"
        logits, grads = forward_backward(cast(torch.nn.Module, torch.compile(other, backend=backend)), images)
    assert logits.device.type == device.type
    assert_as_accurate_as_eager(logits, eager_logits, float64_logits)
    assert_as_accurate_as_eager(grads, eager_grads, float64_grads)
