"""Shared fixtures: compose the real conf/ tree with small, CPU-friendly settings."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from segkit.cli.common import register_configs
from segkit.data.readers.base import SegmentationDataset
from segkit.data.readers.pairs import PairedFiles

from .browser import browser  # noqa: F401 - one Chromium for every module's page tests (session scope)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "segkit" / "conf"
SHARED_DATA = ROOT.parent / "shared" / "datasets"

# Small enough to train in seconds on 2 CPU cores.
TINY = [
    "backbone.name=test_resnet",
    "dataset.image_size=[32,32]",
    "dataset.train_size=16",
    "dataset.val_size=8",
    "trainer.batch_size=4",
    "trainer.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "logger=none",
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a download attempt fails at once instead of retrying
register_configs()


@pytest.fixture(autouse=True, scope="session")
def user_folders(tmp_path_factory):
    """The suite's own user cache (COCO caches, label scans) and runtime folder (the trainings' CPU slots,
    segkit/engine/threads.py), for this process and the commands it starts: tests never write into the
    folders of whoever runs them, nor count that user's trainings as their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
        patch.setenv("SEGKIT_RUNTIME_DIR", str(tmp_path_factory.mktemp("user-runtime")))
        yield


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny tensors: one intra-op thread beats two OpenMP threads contending for 2 cores. Through
    OMP_NUM_THREADS, which the trainer follows (segkit/engine/threads.py), and so do the commands tests start."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(previous)


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    def _compose(overrides: Sequence[str] = (), tiny: bool = True) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=[*(TINY if tiny else []), *overrides])

    return _compose


def write_folder_dataset(root: Path, splits: Sequence[str] = ("train", "val"), count: int = 4,
                         size: tuple[int, int] = (40, 48), num_classes: int = 3,
                         image_dir: str = "images/{split}", mask_dir: str = "masks/{split}",
                         mask_values: Sequence[int] | None = None) -> Path:
    """Write a tiny images/ + masks/ data set: left half class 1, a square of class 2, rest 0."""
    rng = np.random.default_rng(0)
    values = list(mask_values) if mask_values is not None else list(range(num_classes))
    for split in splits:
        images = root / image_dir.format(split=split)
        masks = root / mask_dir.format(split=split)
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            mask = np.full(size, values[0], dtype=np.uint8)
            mask[:, : size[1] // 2] = values[1 % len(values)]
            mask[5:15, 5:15] = values[2 % len(values)]
            image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(image).save(images / f"img_{i:03d}.jpg")
            Image.fromarray(mask).save(masks / f"img_{i:03d}.png")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file a run wrote (epochs.csv, a sweep's leaderboard)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _device_params() -> list:
    """The devices a device-parametrized test runs on: SEGKIT_TEST_DEVICES (comma-separated), by default the
    CPU and CUDA. A CUDA variant carries the `cuda` marker and is skipped without a CUDA device, so the CPU
    runs every test here and `pytest -m cuda` on a GPU runs the same tests there."""
    names = [name.strip() for name in os.environ.get("SEGKIT_TEST_DEVICES", "cpu,cuda").split(",") if name.strip()]
    params = []
    for name in names:
        marks = []
        if name == "cuda":
            marks = [pytest.mark.cuda,
                     pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=_device_params())
def device(request) -> torch.device:
    """The training device of a test that must behave alike on every device (tests/test_devices.py)."""
    return torch.device(request.param)


def one_tensor(prediction: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """`Predictor.predict` of one image or a batch tensor: a tensor (a list of images gives a list)."""
    assert isinstance(prediction, torch.Tensor), type(prediction)
    return prediction


def paired(dataset: SegmentationDataset) -> PairedFiles:
    """A data set read from (image, mask) file pairs, with its `pairs`."""
    assert isinstance(dataset, PairedFiles), type(dataset)
    return dataset
