"""The input path's options: device-resident cache, device prefetcher, GPU decode guard, activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from segkit.data.loading import (
    DeviceCachedBatches,
    DevicePrefetcher,
    EpochSampler,
    build_dataset,
    build_loader,
    device_batches,
)
from segkit.engine.trainer import Trainer, fit
from segkit.errors import ConfigError
from segkit.runs.checkpoint import load_checkpoint

CPU = torch.device("cpu")


def _batches(source, epoch, start=0):
    source.sampler.set_epoch(epoch, start=start)
    return list(source)


@pytest.mark.parametrize("train", [True, False])  # shuffled with drop_last, and in order keeping the last batch
def test_device_cache_yields_the_dataloader_batches_in_the_same_order(compose_cfg, train):
    cfg = compose_cfg(["dataset.train_size=11", "dataset.val_size=11"])
    split = "train" if train else "val"
    plain = build_loader(build_dataset(cfg.dataset, split), batch_size=4, num_workers=0, train=train, seed=3,
                         pin_memory=False)
    cfg.dataset.cache = "device"
    cached_set = build_dataset(cfg.dataset, split)
    cached = DeviceCachedBatches(cached_set, EpochSampler(11, shuffle=train, seed=3), batch_size=4,
                                 drop_last=train, device=CPU, num_workers=0)
    assert len(cached) == len(plain) == (2 if train else 3)
    for epoch, start in ((0, 0), (1, 0), (1, 4)):  # start: the samples a resumed epoch skips
        expected, got = _batches(plain, epoch, start), _batches(cached, epoch, start)
        assert len(got) == len(expected) > 0
        for (image_a, mask_a), (image_b, mask_b) in zip(expected, got, strict=True):
            assert image_b.dtype == torch.uint8 and mask_b.dtype == torch.int64
            assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    if train:
        assert not torch.equal(_batches(cached, 0)[0][0], _batches(cached, 1)[0][0])  # epochs reshuffle


def test_device_cache_trains_like_the_dataloader_and_resumes_exactly(compose_cfg, tmp_path):
    common = ["trainer.max_epochs=2", "trainer.deterministic=true", "augmentation=default"]
    loader_run = fit(compose_cfg(common), tmp_path / "loader")
    cached = [*common, "dataset.cache=device"]
    straight = fit(compose_cfg(cached), tmp_path / "straight")
    stopped = fit(compose_cfg([*cached, "trainer.stop_after_steps=6"]), tmp_path / "split")  # mid-epoch 1
    assert stopped["status"] == "STOPPED"
    resumed = fit(compose_cfg([*cached, "trainer.resume=auto"]), tmp_path / "split")

    assert straight["final"] == loader_run["final"] == resumed["final"]
    weights = [load_checkpoint(tmp_path / run / "checkpoints/last.pt")["model"] for run in ("loader", "straight",
                                                                                           "split")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]) and torch.equal(weights[1][key], weights[2][key]), key


def test_trainer_reads_no_dataloader_with_the_device_cache(compose_cfg, tmp_path):
    trainer = Trainer(compose_cfg(["dataset.cache=device"]), tmp_path)
    assert isinstance(trainer.parts.train_loader, DeviceCachedBatches)
    assert isinstance(trainer.parts.val_loader, DeviceCachedBatches)
    assert trainer.parts.train_loader.images.shape == (16, 3, 32, 32)  # TINY: 16 train images at 32x32
    assert trainer.parts.train_loader.masks.dtype == torch.uint8  # 4 classes and ignore 255 fit a byte


def test_prefetcher_yields_the_loader_batches(compose_cfg):
    cfg = compose_cfg()
    dataset = build_dataset(cfg.dataset, "train")
    prefetched = device_batches(dataset, batch_size=4, num_workers=0, train=True, seed=1, device=CPU)
    assert isinstance(prefetched, DevicePrefetcher) and len(prefetched) == 4
    plain = build_loader(dataset, batch_size=4, num_workers=0, train=True, seed=1, pin_memory=False)
    for (image_a, mask_a), (image_b, mask_b) in zip(_batches(plain, 2), _batches(prefetched, 2), strict=True):
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream copy needs CUDA")
def test_cuda_prefetcher_yields_the_loader_batches(compose_cfg):
    dataset = build_dataset(compose_cfg().dataset, "train")
    cuda = torch.device("cuda")
    plain = build_loader(dataset, batch_size=4, num_workers=0, train=True, seed=1, pin_memory=True)
    prefetched = device_batches(dataset, batch_size=4, num_workers=0, train=True, seed=1, device=cuda)
    for (image_a, mask_a), (image_b, mask_b) in zip(_batches(plain, 0), _batches(prefetched, 0), strict=True):
        assert image_b.device.type == "cuda"
        assert torch.equal(image_a, image_b.cpu()) and torch.equal(mask_a, mask_b.cpu())


@pytest.mark.parametrize(("overrides", "key"), [
    (["dataset.cache=disk"], "dataset.cache"),
    (["dataset.gpu_decode=true"], "dataset.gpu_decode"),  # without cache=device
    (["dataset.cache=device", "dataset.gpu_decode=true", "trainer.accelerator=cpu"], "dataset.gpu_decode"),
])
def test_bad_input_options_name_the_key(compose_cfg, tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Trainer(compose_cfg(overrides), tmp_path)


def test_activation_checkpointing_recomputes_the_encoder_with_the_same_gradients(compose_cfg, tmp_path):
    grads, calls = [], []
    for enabled in (False, True):
        trainer = Trainer(compose_cfg([f"trainer.activation_checkpointing={enabled}"]), tmp_path)
        entered: list[int] = []
        stage = trainer.parts.model.get_submodule("encoder.model.layer1")  # a middle stage: checkpointed when enabled
        stage.register_forward_pre_hook(lambda *_, seen=entered: seen.append(1))  # recompute may stop early
        torch.manual_seed(0)
        images, masks = torch.rand(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
        trainer.parts.loss_fn(trainer.parts.model(images), masks).backward()
        grads.append([p.grad.clone() for p in trainer.parts.model.parameters() if p.grad is not None])
        calls.append(len(entered))
    assert calls == [1, 2]  # checkpointing runs the stage again in backward
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_activation_checkpointing_needs_a_timm_encoder(compose_cfg, tmp_path):
    cfg = compose_cfg(["model=torchvision/lraspp_mobilenet_v3_large", "trainer.activation_checkpointing=true"])
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing"):
        Trainer(cfg, tmp_path)
