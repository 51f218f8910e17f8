"""`segkit.load(path)`: a trained checkpoint as a ready-to-call predictor.

The checkpoint carries its resolved config, so the model is rebuilt exactly as trained
(without downloading ImageNet weights: the checkpoint has all of them) and the user never
touches Hydra. That config may come from someone else: it only builds allowlisted segkit code
(segkit/engine/trusted.py) unless the caller passes trust=True. Inputs may be tensors, PIL
images or numpy arrays; outputs are class ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from segkit.config import build
from segkit.engine.checkpoint import load_checkpoint, load_safetensors, read_safetensors_config
from segkit.engine.run_dir import RunDir
from segkit.engine.step import autocast, resolve_device, to_model_input, use_channels_last
from segkit.engine.trusted import checked_checkpoint_config
from segkit.errors import CheckpointError
from segkit.inference.sliding import DEFAULT_TTA_SCALES, predict_logits, predict_probs
from segkit.models import Segmenter

ImageLike = Any  # torch.Tensor | PIL.Image.Image | np.ndarray


def tta_settings(tta: bool | Mapping[str, Any] | None) -> tuple[tuple[float, ...], bool]:
    """tta=True means flips x scales 0.75/1.0/1.25; a mapping may give `scales` and `flip`."""
    if not tta:
        return (1.0,), False
    if tta is True:
        return DEFAULT_TTA_SCALES, True
    return tuple(float(s) for s in tta.get("scales", DEFAULT_TTA_SCALES)), bool(tta.get("flip", True))


class Predictor:
    """A loaded model plus what is needed to use it: class names, training size, settings."""

    def __init__(self, model: Segmenter, cfg: DictConfig, device: torch.device, source: str = "") -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.device = device
        self.source = source
        dataset = cfg.dataset
        self.num_classes = int(dataset.num_classes)
        names = dataset.get("class_names")
        if not names and source:
            names = class_names_of_run(Path(source), self.num_classes)
        self.class_names = list(names) if names else [f"class_{i}" for i in range(self.num_classes)]
        colors = dataset.get("colors")
        self.colors: list[list[int]] | None = [list(c) for c in colors] if colors else None
        self.ignore_index = int(dataset.get("ignore_index", 255))
        self.image_size: tuple[int, int] = (int(dataset.image_size[0]), int(dataset.image_size[1]))
        trainer = cfg.get("trainer") or {}
        self.channels_last = use_channels_last(trainer.get("channels_last"), device)
        self.precision = str(trainer.get("precision", "32"))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def temperature(self) -> float:
        """Logits are divided by it (segkit-calibrate); 1.0 when the checkpoint was never calibrated."""
        return float(getattr(self.model, "temperature", 1.0))

    def __repr__(self) -> str:
        return f"Predictor({self.source or type(self.model.net).__name__}, classes={self.class_names})"

    def autocast(self) -> AbstractContextManager:
        """The checkpoint's training precision, so evaluation sees the numbers validation saw."""
        return autocast(self.device, self.precision)

    def logits(
        self,
        images: torch.Tensor,
        mode: str = "whole",
        tta: bool | Mapping[str, Any] | None = False,
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """images: uint8 or float in [0, 1] (B, 3, H, W) on any device -> scores (B, C, H, W) on self.device."""
        return self._run(predict_logits, images, mode, tta, crop_size, stride)

    def probabilities(
        self,
        images: torch.Tensor,
        mode: str = "whole",
        tta: bool | Mapping[str, Any] | None = False,
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Softmax probabilities (B, C, H, W), averaged over the TTA variants."""
        return self._run(predict_probs, images, mode, tta, crop_size, stride)

    def _run(self, predict_fn: Callable[..., torch.Tensor], images: torch.Tensor, mode: str,
             tta: bool | Mapping[str, Any] | None, crop_size: Sequence[int] | None,
             stride: Sequence[int] | None) -> torch.Tensor:
        scales, flip = tta_settings(tta)
        images = to_model_input(images, self.device, self.channels_last)
        with self.autocast():
            return predict_fn(self.model, images, mode, crop_size or self.image_size, stride, scales, flip)

    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        return_logits: bool = False,
        mode: str = "auto",
        tta: bool | Mapping[str, Any] | None = False,
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Class ids (H, W) int64 for one image, (B, H, W) for a batch tensor, a list for a list.

        `mode="auto"` slides a window of the training size over images larger than it.
        With `return_logits=True` the scores (C, H, W) / (B, C, H, W) come back instead.
        Results are on the CPU.
        """
        if isinstance(images, (list, tuple)):
            return [self.predict(image, return_logits, mode, tta, crop_size, stride) for image in images]
        batch, single = to_batch(images)
        scores = self.logits(batch, mode, tta, crop_size, stride).float().cpu()
        out = scores if return_logits else scores.argmax(1)
        return out[0] if single else out


def class_names_of_run(checkpoint: Path, num_classes: int) -> list[str] | None:
    """Names the data set itself supplied (e.g. a dataset.json), as the run's metrics.json recorded them."""
    names = (RunDir.of_checkpoint(checkpoint).read_metrics() or {}).get("class_names")
    return list(names) if isinstance(names, list) and len(names) == num_classes else None


def to_batch(image: ImageLike) -> tuple[torch.Tensor, bool]:
    """Any supported image -> (uint8, or float in [0, 1], (B, 3, H, W); whether it was a single image).

    uint8 stays uint8: `to_model_input` divides by 255 on the model's device."""
    if not isinstance(image, (torch.Tensor, np.ndarray)):
        try:  # PIL images
            image = np.asarray(image.convert("RGB"))
        except AttributeError:
            kind = type(image).__name__
            raise TypeError(f"expected a tensor, a PIL image or a numpy array, got {kind}") from None
    if isinstance(image, np.ndarray):  # HWC (or BHWC) like PIL / OpenCV give them
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        tensor = torch.from_numpy(np.array(image, copy=not image.flags.writeable, order="C"))
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    else:
        tensor = image
    single = tensor.ndim == 3
    if single:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
        shape = tuple(tensor.shape)
        raise ValueError(f"expected an image (3, H, W) or a batch (B, 3, H, W), got shape {shape}")
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    if tensor.dtype == torch.uint8:
        return tensor, single
    if not tensor.is_floating_point():
        raise ValueError(f"expected uint8 or float images, got {tensor.dtype}")
    return tensor.float(), single


def model_config(config_yaml: str, path: Path, trust: bool = False) -> DictConfig:
    """The training config stored in a checkpoint, with pretrained weights switched off.

    Unless `trust`, the config is resolved and checked (segkit/engine/trusted.py) before anything is
    built from it: its model and dataset may only name allowlisted segkit code."""
    try:
        cfg = OmegaConf.create(config_yaml)
    except Exception as error:  # noqa: BLE001 - any YAML problem gets the same one-line report
        reason = str(error).splitlines()[0]
        raise CheckpointError(f"{path}: stored config is not valid YAML ({reason})") from None
    if isinstance(cfg, DictConfig) and not trust:
        cfg = checked_checkpoint_config(cfg, str(path))
    if not isinstance(cfg, DictConfig) or cfg.get("model") is None or cfg.get("dataset") is None:
        raise CheckpointError(f"{path}: stored config has no model/dataset section")
    backbone = cfg.model.get("backbone")
    if isinstance(backbone, DictConfig):  # the checkpoint holds every weight: never download
        backbone.pretrained = False
        backbone.weights = None
    return cfg


def stored_temperature(state: Mapping[str, Any], path: Path) -> float:
    """The temperature segkit-calibrate stored in the checkpoint (1.0 when never calibrated)."""
    calibration = state.get("calibration") or {}
    temperature = calibration.get("temperature", 1.0) if isinstance(calibration, Mapping) else None
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise CheckpointError(f"{path}: calibration.temperature must be a positive number, got {temperature!r}")
    return float(temperature)


def load(path: str | Path, device: str | torch.device | None = "auto", trust: bool = False) -> Predictor:
    """Rebuild the model from a segkit checkpoint (`best.pt` / `last.pt`) and load its weights.

    `best.safetensors` (from `segkit-export format=safetensors`) is read with the `best.yaml` beside it.
    Only tensors and plain values are read, and the stored config may only build segkit's own model
    and data set code; anything else is refused before it is called. `trust=True` skips that check
    for a file whose author you trust (a model built by your own code)."""
    path = Path(path).expanduser()
    state = None
    if path.suffix == ".safetensors":
        config = read_safetensors_config(path)
    else:
        state = load_checkpoint(path)
        config = state.get("config")
        if not isinstance(config, str):
            raise CheckpointError(f"{path}: no stored config; the checkpoint was not written by segkit's trainer")
    cfg = model_config(config, path, trust)
    model = build(cfg.model, "model")
    if cfg.get("privacy") is not None:  # trained with DP-SGD: BatchNorm was replaced by GroupNorm
        from segkit.privacy import make_model_private_compatible

        model = make_model_private_compatible(model)
    if state is None:
        load_safetensors(model, path)
    else:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            reason = str(error).splitlines()[0]
            raise CheckpointError(f"{path}: weights do not fit the stored model ({reason})") from None
        model.temperature = stored_temperature(state, path)
    target = resolve_device(device)
    return Predictor(model.to(target), cfg, target, source=str(path))
