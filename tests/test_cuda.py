"""What only CUDA has: `pytest -m cuda` on a GPU adds these to the device suite (tests/test_devices.py).

Everything else the GPU runs (precisions, GradScaler's skip of a non-finite step, exact resume, channels_last,
torch.compile, the prefetcher, the device cache, Kornia on the device) is a test of tests/test_devices.py, run on
the CPU always and on CUDA when there is one. Here, skipped without CUDA: nvjpeg decoding, CUDA memory statistics
and a real out-of-memory, NCCL and SyncBatchNorm, and sync-debug mode (no host sync in the optimizer step).
Tolerances compare two computations of one function; each says what arithmetic bounds it.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from segkit.config import build
from segkit.data.io import read_image
from segkit.data.loading import build_dataset, decode_split
from segkit.engine.distributed import DistContext, wrap_model
from segkit.engine.trainer import Trainer, fit
from segkit.errors import SegkitError

from .conftest import read_csv
from .test_devices import assert_as_accurate_as_eager, exact_float32, forward_backward

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
ON_CUDA = ["trainer.accelerator=cuda"]
__all__ = ["exact_float32"]  # a fixture, used by name


# ---------------------------------------------------------------------------- nvjpeg
def _smooth_jpeg(path, size: tuple[int, int], seed: int, subsampling: int) -> None:
    """A photo-like image: smooth colour gradients plus mild noise (no sharp edges for the chroma filters)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float64)
    channels = [127 + 100 * np.sin(xs / (17 + 5 * c) + ys / (23 + 7 * c) + rng.uniform(0, 6)) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 3, (*size, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90, subsampling=subsampling)


def _chroma_steps(image: torch.Tensor) -> tuple[float, float]:
    """The largest and the mean difference between neighbouring 2x2-subsampled chroma samples (Cb, Cr)."""
    ycbcr = np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).convert("YCbCr"), dtype=np.float64)
    chroma = ycbcr[::2, ::2, 1:]
    steps = [np.abs(np.diff(chroma, axis=0)), np.abs(np.diff(chroma, axis=1))]
    return float(max(step.max() for step in steps)), float(np.mean([step.mean() for step in steps]))


# JPEG decoders may differ: ISO/IEC 10918-2 lets a conforming IDCT be off by 1 level per sample, so libjpeg-turbo
# and nvjpeg may disagree by 2, plus 1 each for rounding YCbCr -> RGB: 4 at most with full-resolution chroma, and
# 1 on average. With 4:2:0 the chroma upsampling filter is the decoder's choice too: libjpeg-turbo's triangle
# filter weighs the nearer chroma sample 3/4 and the farther 1/4 in each direction, a decoder that replicates
# the nearer one differs by 1/4 of a neighbouring step per direction, 1/2 of it in 2-D; YCbCr -> RGB multiplies
# chroma by at most 1.772 (Cb into blue). So 0.886 x this image's chroma steps is added to both bounds.
@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0
def test_nvjpeg_decode_equals_the_cpu_decode_within_jpeg_tolerance(tmp_path, subsampling):
    path = tmp_path / "photo.jpg"
    _smooth_jpeg(path, (120, 160), seed=subsampling, subsampling=subsampling)
    on_cpu = read_image(path)
    on_gpu = read_image(path, CUDA)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8 and on_gpu.shape == on_cpu.shape
    largest, mean = _chroma_steps(on_cpu) if subsampling else (0.0, 0.0)
    diff = (on_gpu.cpu().int() - on_cpu.int()).abs()
    assert int(diff.max()) <= 4 + math.ceil(0.886 * largest)
    assert float(diff.float().mean()) <= 1.0 + 0.886 * mean


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
    cfg_cpu, cfg_gpu = compose_cfg(folder, tiny=False), compose_cfg([*folder, "dataset.gpu_decode=true"], tiny=False)
    images_cpu, masks_cpu = decode_split(build_dataset(cfg_cpu.dataset, "train"), CUDA, 0, 2)
    images_gpu, masks_gpu = decode_split(build_dataset(cfg_gpu.dataset, "train"), CUDA, 0, 2)
    assert torch.equal(masks_cpu, masks_gpu)
    assert int((images_gpu.int() - images_cpu.int()).abs().max()) <= 4  # the 4:4:4 bound above


# ---------------------------------------------------------------------------- sync-debug mode
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_the_optimizer_step_skips_an_injected_inf_without_any_host_sync(compose_cfg, tmp_path, precision):
    """tests/test_devices.py sees Python-level reads on every device; sync-debug mode sees every device -> host
    wait, also those inside torch's C++ (GradScaler's inf check, the fused optimizer)."""
    trainer = Trainer(compose_cfg([*ON_CUDA, f"trainer.precision={precision}"]), tmp_path)
    poison = torch.full((), float("inf"), device=CUDA)
    loss_fn = trainer.parts.step.loss_fn
    # The step only calls its loss: a poisoned function stands in for the loss Module.
    step = dataclasses.replace(trainer.parts.step,
                               loss_fn=lambda logits, masks: loss_fn(logits, masks) * poison)  # type: ignore[arg-type]
    images, masks = next(iter(trainer.parts.train_loader))
    before = [p.detach().clone() for p in trainer.parts.model.parameters()]
    for poisoned in (True, False):
        poison.fill_(float("inf") if poisoned else 1.0)
        step.backward(images, masks)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any device -> host wait inside raises
        try:
            step.optimizer_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.parts.model.parameters(), strict=True))
        assert unchanged == poisoned  # the poisoned step was skipped, the finite one trained
    assert all(torch.isfinite(p).all() for p in trainer.parts.model.parameters())


# ---------------------------------------------------------------------------- CUDA memory
def test_a_run_logs_its_peak_memory(compose_cfg, tmp_path):
    summary = fit(compose_cfg([*ON_CUDA, "trainer.precision=bf16-mixed", "trainer.max_epochs=2"]), tmp_path)
    assert summary["status"] == "FINISHED"
    rows = read_csv(tmp_path / "epochs.csv")
    assert len(rows) == 2 and all(float(row["train/peak_memory_gib"]) > 0 for row in rows)


def test_a_real_allocation_failure_becomes_the_one_line_out_of_memory_message(compose_cfg, tmp_path):
    cfg = compose_cfg([*ON_CUDA, "dataset.image_size=[256,256]", "trainer.batch_size=8", "dataset.train_size=16"])
    trainer = Trainer(cfg, tmp_path)
    torch.cuda.synchronize()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    # The allocator may hold what it holds now plus 1 MiB: the first batch's activations cannot fit.
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 2**20) / total)
    try:
        with pytest.raises(SegkitError) as caught:
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
        float64_logits, float64_grads = forward_backward(copy.deepcopy(plain).double(), images.double())
        eager_logits, eager_grads = forward_backward(plain, images)
        logits, grads = forward_backward(synced, images)
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    assert_as_accurate_as_eager(logits, eager_logits, float64_logits)
    assert_as_accurate_as_eager(grads, eager_grads, float64_grads)


def running_mean(norm: torch.nn.BatchNorm2d | torch.nn.SyncBatchNorm) -> torch.Tensor:
    """A BatchNorm layer's running mean (it tracks running statistics, the default)."""
    assert norm.running_mean is not None, norm
    return norm.running_mean


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
        logits, grads = forward_backward(synced, images[rank * half : (rank + 1) * half].to(device))
        running = [running_mean(m).cpu() for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
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
    float64_logits, float64_grads = forward_backward(float64, images.double().to(CUDA))
    plain = plain.to(CUDA)
    eager_logits, eager_grads = forward_backward(plain, images.to(CUDA))
    ranks = [torch.load(f"{results}.{rank}") for rank in (0, 1)]
    # Statistics of the two halves combined (Welford counts) versus over the whole batch at once; DDP averages
    # the two halves' gradients, which is the whole batch's mean loss.
    logits = torch.cat([r["logits"] for r in ranks])
    assert_as_accurate_as_eager(logits, eager_logits.cpu(), float64_logits.cpu())
    for rank in ranks:
        assert_as_accurate_as_eager(rank["grads"], eager_grads.cpu(), float64_grads.cpu())
    running_means = [torch.cat([running_mean(m).flatten().cpu() for m in model.modules()
                                if isinstance(m, torch.nn.BatchNorm2d)]) for model in (plain, float64)]
    assert_as_accurate_as_eager(torch.cat([m.flatten() for m in ranks[0]["running_means"]]), *running_means)
