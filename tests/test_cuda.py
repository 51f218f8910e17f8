"""The GPU path on a real CUDA device: `pytest -m cuda tests/test_cuda.py` (scripts/gpu_check.sh runs it).

Skipped without CUDA. Each test runs a piece that only a GPU executes (side-stream prefetch, the device cache,
nvjpeg, GradScaler's on-device skip, channels_last, torch.compile, a real out-of-memory, SyncBatchNorm over
NCCL, peak-memory logging) and compares it with the CPU or eager computation it must equal.
Tolerances compare two computations of one function; each says what arithmetic bounds it.
"""

from __future__ import annotations

import copy
import csv
import gc
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from segkit.config import build
from segkit.data.io import read_image
from segkit.data.loading import (
    DeviceCachedBatches,
    DevicePrefetcher,
    EpochSampler,
    build_dataset,
    build_loader,
    decode_split,
)
from segkit.engine.distributed import DistContext, wrap_model
from segkit.engine.failures import OutOfMemory
from segkit.engine.trainer import Trainer, fit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
ON_CUDA = ["trainer.accelerator=cuda"]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ in float64; NaN or Inf never passes."""
    got, expected = got.double(), expected.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_as_accurate_as_eager(variant: torch.Tensor, eager: torch.Tensor, float64: torch.Tensor) -> None:
    """`variant` is as close to the float64 result as the eager float32 computation is, within a factor of 10.

    Two float32 computations of one function may round differently (other conv algorithms, fused kernels,
    statistics gathered otherwise), and gradients through BatchNorm's mean subtraction cancel, so even eager
    float32 is ~1e-3 off float64 there while the logits are ~1e-5 off. Ten times the eager error (at least
    1e-4) leaves room for another rounding order; a wrong layout, a missed sync or a miscompiled op is O(1).
    """
    assert variant.shape == eager.shape == float64.shape
    bound = max(10 * relative_error(eager, float64), 1e-4)
    assert relative_error(variant, float64) <= bound


@pytest.fixture
def exact_float32():
    """Convolutions and matmuls in full float32 (not TF32), so two orders of the same sums differ by rounding only."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------- the input path
def test_prefetcher_yields_the_loaders_batches_on_the_device(compose_cfg):
    dataset = build_dataset(compose_cfg(["dataset.train_size=12"]).dataset, "train")
    reference = build_loader(dataset, batch_size=4, num_workers=0, train=True, seed=3, pin_memory=False)
    loader = build_loader(dataset, batch_size=4, num_workers=2, train=True, seed=3, pin_memory=True)
    prefetcher = DevicePrefetcher(loader, CUDA)
    assert prefetcher.sampler is loader.sampler and len(prefetcher) == len(reference) == 3
    for epoch in (0, 1):
        reference.sampler.set_epoch(epoch)
        prefetcher.sampler.set_epoch(epoch)
        # Work on each batch on the compute stream while the next copy is in flight on the side stream:
        # a missing stream wait would read a half-copied batch.
        sums = [(images.float().sum(dim=(1, 2, 3)), masks.sum(dim=(1, 2)), images.device, masks.dtype)
                for images, masks in prefetcher]
        expected = [(images.float().sum(dim=(1, 2, 3)), masks.sum(dim=(1, 2))) for images, masks in reference]
        assert len(sums) == len(expected)
        for (image_sum, mask_sum, device, mask_dtype), (image_ref, mask_ref) in zip(sums, expected, strict=True):
            assert device.type == "cuda" and mask_dtype == torch.int64
            assert torch.equal(image_sum.cpu(), image_ref) and torch.equal(mask_sum.cpu(), mask_ref)


@pytest.mark.parametrize("train", [True, False])
def test_device_cache_on_cuda_yields_the_dataloader_batches_in_order(compose_cfg, train):
    cfg = compose_cfg(["dataset.train_size=11", "dataset.val_size=11"])
    split = "train" if train else "val"
    plain = build_loader(build_dataset(cfg.dataset, split), batch_size=4, num_workers=0, train=train, seed=3,
                         pin_memory=False)
    cfg.dataset.cache = "device"
    cached = DeviceCachedBatches(build_dataset(cfg.dataset, split), EpochSampler(11, shuffle=train, seed=3),
                                 batch_size=4, drop_last=train, device=CUDA, num_workers=2)
    assert cached.images.device.type == "cuda"
    for epoch, start in ((0, 0), (1, 0), (1, 4)):  # start: the samples a resumed epoch skips
        plain.sampler.set_epoch(epoch, start=start)
        cached.sampler.set_epoch(epoch, start=start)
        expected, got = list(plain), list(cached)
        assert len(got) == len(expected) > 0
        for (image_a, mask_a), (image_b, mask_b) in zip(expected, got, strict=True):
            assert image_b.device.type == "cuda" and mask_b.dtype == torch.int64
            assert torch.equal(image_a, image_b.cpu()) and torch.equal(mask_a, mask_b.cpu())


def test_training_from_the_device_cache_resumes_on_exactly_the_remaining_batches(compose_cfg, tmp_path):
    common = [*ON_CUDA, "dataset.cache=device", "trainer.max_epochs=2"]  # 4 steps per epoch
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
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    assert resumed.fit()["status"] == "FINISHED"


def _smooth_jpeg(path, size: tuple[int, int], seed: int, subsampling: int) -> None:
    """A photo-like image: smooth colour gradients plus mild noise (no sharp edges for the chroma filters)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float64)
    channels = [127 + 100 * np.sin(xs / (17 + 5 * c) + ys / (23 + 7 * c) + rng.uniform(0, 6)) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 3, (*size, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90, subsampling=subsampling)


# JPEG decoders may differ: ISO/IEC 10918-2 lets a conforming IDCT be off by 1 level per sample, so libjpeg-turbo
# and nvjpeg may disagree by 2, plus 1 each for rounding YCbCr -> RGB: 4 at most with full-resolution chroma.
# With 4:2:0 the chroma upsampling filter is the decoder's choice too (libjpeg-turbo interpolates, others may
# replicate): on these smooth images neighbouring chroma samples differ by a few levels, which bounds it by 8.
@pytest.mark.parametrize(("subsampling", "max_diff"), [(0, 4), (2, 8)])  # 4:4:4 and 4:2:0
def test_nvjpeg_decode_equals_the_cpu_decode_within_jpeg_tolerance(tmp_path, subsampling, max_diff):
    path = tmp_path / "photo.jpg"
    _smooth_jpeg(path, (120, 160), seed=subsampling, subsampling=subsampling)
    on_cpu = read_image(path)
    on_gpu = read_image(path, CUDA)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8 and on_gpu.shape == on_cpu.shape
    diff = (on_gpu.cpu().int() - on_cpu.int()).abs()
    assert int(diff.max()) <= max_diff and float(diff.float().mean()) <= 1.0


def test_gpu_decode_fills_the_device_cache_like_the_cpu_decode(compose_cfg, tmp_path):
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
        for i in range(5):
            _smooth_jpeg(tmp_path / "images" / split / f"{i}.jpg", (48, 64), seed=i, subsampling=0)
            mask = np.random.default_rng(i).integers(0, 3, (48, 64), dtype=np.uint8)
            Image.fromarray(mask).save(tmp_path / "masks" / split / f"{i}.png")
    # image_size = the files' size: no resizing, so the two caches differ by the decoders alone.
    folder = ["dataset=folder", f"dataset.root={tmp_path}", "dataset.num_classes=3", "dataset.image_size=[48,64]",
              "dataset.cache=device"]
    cfg_cpu, cfg_gpu = compose_cfg(folder), compose_cfg([*folder, "dataset.gpu_decode=true"])
    images_cpu, masks_cpu = decode_split(build_dataset(cfg_cpu.dataset, "train"), CUDA, 0, 2)
    images_gpu, masks_gpu = decode_split(build_dataset(cfg_gpu.dataset, "train"), CUDA, 0, 2)
    assert torch.equal(masks_cpu, masks_gpu)
    assert int((images_gpu.int() - images_cpu.int()).abs().max()) <= 4  # the 4:4:4 bound above


# ---------------------------------------------------------------------------- the training step
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_injected_inf_is_skipped_on_the_device_without_a_host_sync(compose_cfg, tmp_path, precision):
    trainer = Trainer(compose_cfg([*ON_CUDA, f"trainer.precision={precision}"]), tmp_path)
    images, masks = next(iter(trainer.parts.train_loader))
    images = images.float().div_(255)

    def backward(poison: float) -> None:
        with trainer.parts.step.autocast():
            logits = trainer.parts.step.forward(images)
        trainer.parts.scaler.scale(trainer.parts.loss_fn(logits.float(), masks) * poison).backward()

    def optimizer_step_without_sync() -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any device -> host wait inside raises
        try:
            trainer.parts.step.optimizer_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    before = [p.detach().clone() for p in trainer.parts.model.parameters()]
    scale = trainer.parts.scaler.get_scale()  # a host read, before the checked region
    backward(float("inf"))
    assert not all(torch.isfinite(p.grad).all() for p in trainer.parts.model.parameters() if p.grad is not None)
    optimizer_step_without_sync()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.parts.model.parameters(), strict=True))  # skipped
    assert trainer.parts.scheduler.last_epoch == 1  # the schedule advanced all the same
    if precision == "16-mixed":
        assert trainer.parts.scaler.get_scale() == scale * 0.5  # the loss scale backed off, on the device

    backward(1.0)  # a finite step right after still trains
    optimizer_step_without_sync()
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.parts.model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.parts.model.parameters())


def _forward_backward(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and every parameter's gradient as one vector. Compared as one vector: some gradients are zero in
    exact arithmetic (a conv bias before BatchNorm), so their own relative error would be rounding noise over 0."""
    model.zero_grad(set_to_none=True)
    logits = model(images)
    logits.float().square().mean().backward()
    grads = torch.cat([p.grad.detach().flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach().float(), grads


@pytest.mark.parametrize("variant", ["channels_last", "compile"])
def test_channels_last_and_compile_give_the_eager_result(compose_cfg, exact_float32, variant):
    torch.manual_seed(0)
    eager = build(compose_cfg().model, "model").to(CUDA)  # U-Net on timm's small test ResNet: compiles fast
    other, reference = copy.deepcopy(eager), copy.deepcopy(eager).double()
    images = torch.rand(2, 3, 96, 128, device=CUDA)
    eager_logits, eager_grads = _forward_backward(eager, images)
    float64_logits, float64_grads = _forward_backward(reference, images.double())
    if variant == "channels_last":
        other = other.to(memory_format=torch.channels_last)
        logits, grads = _forward_backward(other, images.contiguous(memory_format=torch.channels_last))
    else:
        logits, grads = _forward_backward(torch.compile(other), images)
    assert_as_accurate_as_eager(logits, eager_logits, float64_logits)
    assert_as_accurate_as_eager(grads, eager_grads, float64_grads)


def test_a_real_allocation_failure_becomes_the_one_line_out_of_memory_message(compose_cfg, tmp_path):
    cfg = compose_cfg([*ON_CUDA, "dataset.image_size=[256,256]", "trainer.batch_size=8", "dataset.train_size=16"])
    trainer = Trainer(cfg, tmp_path)
    torch.cuda.synchronize()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    # The allocator may hold what it holds now plus 1 MiB: the first batch's activations cannot fit.
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 2**20) / total)
    try:
        with pytest.raises(OutOfMemory) as caught:
            trainer.fit()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cuda out of memory in training at step 0")
    assert "batch size 8 at image size 256x256" in message and "CUDA out of memory" in message
    assert "trainer.accumulate_grad_batches" in message and "bf16-mixed" in message
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "FAILED"
    del trainer, caught
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_a_mixed_precision_run_trains_and_logs_peak_memory(compose_cfg, tmp_path, precision):
    summary = fit(compose_cfg([*ON_CUDA, f"trainer.precision={precision}", "trainer.max_epochs=2"]), tmp_path)
    assert summary["status"] == "FINISHED" and summary["bad_steps"] == 0
    assert 0 <= summary["final"]["miou"] <= 1
    with open(tmp_path / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(float(row["train/peak_memory_gib"]) > 0 for row in rows)


# ---------------------------------------------------------------------------- several processes' parts
def test_nccl_process_group_wraps_the_model_with_sync_batchnorm(compose_cfg, tmp_path, exact_float32):
    """One GPU hosts one NCCL rank: a group of one, whose context says two processes so wrap_model takes its
    multi-process path (SyncBatchNorm + DistributedDataParallel on this device). With one member SyncBatchNorm
    normalises locally, so the wrapped model must give the plain model's logits and gradients."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = build(compose_cfg().model, "model").to(CUDA).train()
        device = torch.device("cuda", torch.cuda.current_device())
        synced = wrap_model(copy.deepcopy(plain), DistContext(rank=0, world_size=2), device, sync_batchnorm=True)
        assert dist.get_backend() == "nccl" and isinstance(synced, DistributedDataParallel)
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        images = torch.rand(4, 3, 64, 64, device=CUDA)
        float64_logits, float64_grads = _forward_backward(copy.deepcopy(plain).double(), images.double())
        eager_logits, eager_grads = _forward_backward(plain, images)
        logits, grads = _forward_backward(synced, images)
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    assert_as_accurate_as_eager(logits, eager_logits, float64_logits)
    assert_as_accurate_as_eager(grads, eager_grads, float64_grads)


def _sync_batchnorm_rank(rank: int, model_cfg: dict, weights: dict, images: torch.Tensor, rendezvous: str,
                         results: str) -> None:
    """One of two processes on the same GPU; NCCL refuses two ranks on one device, so they talk over gloo
    (which carries CUDA tensors). Each takes half the batch; SyncBatchNorm shares the batch statistics."""
    from omegaconf import OmegaConf

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model = build(OmegaConf.create(model_cfg), "model")
        model.load_state_dict(weights)
        device = torch.device("cuda", 0)
        synced = wrap_model(model.to(device).train(), DistContext(rank=rank, world_size=2), device,
                            sync_batchnorm=True)
        half = images.shape[0] // 2
        logits, grads = _forward_backward(synced, images[rank * half : (rank + 1) * half].to(device))
        running = [m.running_mean.cpu() for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert running  # converted
        torch.save({"logits": logits.cpu(), "grads": grads.cpu(), "running_means": running},
                   f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_over_two_processes_on_one_gpu_equals_batchnorm_over_the_whole_batch(
        compose_cfg, tmp_path, exact_float32):
    torch.manual_seed(0)
    cfg = compose_cfg()
    plain = build(cfg.model, "model").train()
    weights = copy.deepcopy(plain.state_dict())
    images = torch.rand(4, 3, 64, 64)
    results = str(tmp_path / "rank")
    torch.multiprocessing.spawn(
        _sync_batchnorm_rank, nprocs=2,
        args=(OmegaConf.to_container(cfg.model, resolve=True), weights, images, str(tmp_path / "rendezvous"), results),
    )
    float64 = copy.deepcopy(plain).double().to(CUDA)
    float64_logits, float64_grads = _forward_backward(float64, images.double().to(CUDA))
    plain = plain.to(CUDA)
    eager_logits, eager_grads = _forward_backward(plain, images.to(CUDA))
    ranks = [torch.load(f"{results}.{rank}") for rank in (0, 1)]
    # Statistics of the two halves combined (Welford counts) versus over the whole batch at once; DDP averages
    # the two halves' gradients, which is the whole batch's mean loss.
    logits = torch.cat([r["logits"] for r in ranks])
    assert_as_accurate_as_eager(logits, eager_logits.cpu(), float64_logits.cpu())
    for rank in ranks:
        assert_as_accurate_as_eager(rank["grads"], eager_grads.cpu(), float64_grads.cpu())
    running_means = [torch.cat([m.running_mean.flatten().cpu() for m in model.modules()
                                if isinstance(m, torch.nn.BatchNorm2d)]) for model in (plain, float64)]
    assert_as_accurate_as_eager(torch.cat([m.flatten() for m in ranks[0]["running_means"]]), *running_means)
