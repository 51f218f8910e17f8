"""`segkit.load(path)`: a trained checkpoint as a ready-to-call predictor.

The checkpoint carries its resolved config and its training geometry, so the model is rebuilt
exactly as trained (without downloading ImageNet weights: the checkpoint has all of them) and
sees at prediction time what it saw in training: every image is letterboxed to the training
scale, predicted (whole, or in sliding windows for crop-trained models), and its scores are
resized back to the image's own size before the argmax (segkit/data/geometry.py). Inputs may be
tensors, PIL images or numpy arrays; outputs are class ids at the input's size. The file is read once
into a `CheckpointRecord` (segkit/runs/checkpoint.py), whose config may come from someone else: it
only builds allowlisted segkit code (segkit/runs/trusted.py) unless the caller passes trust=True.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig

from segkit.config import build
from segkit.data.geometry import TrainingGeometry, letterbox_images, restore_logits
from segkit.engine.step import autocast, resolve_device, to_model_input, use_channels_last
from segkit.errors import ConfigError
from segkit.inference.uncertainty import DEFAULT_MC_SAMPLES, Moments, Uncertainty, check_method, sampled_probs
from segkit.models import Segmenter
from segkit.models.sliding import DEFAULT_TTA_SCALES, MODES, predict_logits, probs_to_logits
from segkit.runs.checkpoint import CheckpointRecord, read_checkpoint

ImageLike = Any  # torch.Tensor | PIL.Image.Image | np.ndarray


def tta_settings(tta: bool | Mapping[str, Any] | None) -> tuple[tuple[float, ...], bool]:
    """tta=True means flips x scales 0.75/1.0/1.25 of the training scale; a mapping may give `scales` and `flip`."""
    if not tta:
        return (1.0,), False
    if tta is True:
        return DEFAULT_TTA_SCALES, True
    return tuple(float(s) for s in tta.get("scales", DEFAULT_TTA_SCALES)), bool(tta.get("flip", True))


def tta_option(cfg: Mapping[str, Any]) -> dict[str, Any] | bool:
    """The `tta` argument from an entry point's `tta`, `tta_scales`, `tta_flip` keys."""
    return {"scales": list(cfg["tta_scales"]), "flip": bool(cfg["tta_flip"])} if cfg["tta"] else False


class Predictor:
    """A loaded model plus what is needed to use it: class names, training geometry, settings.

    Options shared by `predict`, `logits`, `probabilities` and `uncertainty` (which also takes `method`
    softmax | tta_variance | mc_dropout and `mc_samples`, segkit/inference/uncertainty.py):
      mode       auto (the training geometry decides, trainer.inference_mode: by default sliding
                 windows for crop-trained models, else the whole letterboxed image) | whole | slide
      tta        False | True (flips x scales 0.75/1.0/1.25) | {"scales": [...], "flip": bool};
                 scales are relative to the training scale
      crop_size  sliding window [H, W] (default: the training crop)
      stride     sliding window step (default: two thirds of the window)
      test_size  the box [H, W] images are letterboxed into (default: the training image size);
                 another test scale, e.g. the native size, with the padding and resizing as usual
    """

    def __init__(self, model: Segmenter, cfg: DictConfig, device: torch.device, source: str = "",
                 geometry: TrainingGeometry | None = None, class_names: Sequence[str] | None = None) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.device = device
        self.source = source
        dataset = cfg.dataset
        self.num_classes = int(dataset.num_classes)
        names = class_names or dataset.get("class_names")
        self.class_names = list(names) if names else [f"class_{i}" for i in range(self.num_classes)]
        colors = dataset.get("colors")
        self.colors: list[list[int]] | None = [list(c) for c in colors] if colors else None
        self.ignore_index = int(dataset.get("ignore_index", 255))
        self.geometry = geometry or TrainingGeometry.from_config(cfg)
        self.image_size: tuple[int, int] = self.geometry.image_size
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

    def logits(self, images: torch.Tensor, mode: str = "auto", tta: bool | Mapping[str, Any] | None = False,
               crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None,
               test_size: Sequence[int] | None = None) -> torch.Tensor:
        """Images (B, 3, H, W), uint8 or float in [0, 1], at their own size -> scores (B, C, H, W) at (H, W).

        The scores are computed on the letterboxed image and resized back before any argmax or softmax,
        so every consumer (argmax, probabilities, an ensemble) sees the same numbers.
        """
        box = test_size or self.geometry.image_size
        boxed = letterbox_images(images.to(self.device), box)
        return restore_logits(self.box_logits(boxed, mode, tta, crop_size, stride), images.shape[-2:])

    def probabilities(self, images: torch.Tensor, mode: str = "auto",
                      tta: bool | Mapping[str, Any] | None = False, crop_size: Sequence[int] | None = None,
                      stride: Sequence[int] | None = None, test_size: Sequence[int] | None = None) -> torch.Tensor:
        """Softmax probabilities (B, C, H, W) at the images' size (averaged over the TTA variants)."""
        return self.logits(images, mode, tta, crop_size, stride, test_size).float().softmax(1)

    def box_logits(self, boxed: torch.Tensor, mode: str = "auto", tta: bool | Mapping[str, Any] | None = False,
                   crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None) -> torch.Tensor:
        """Scores (B, C, h, w) of images already letterboxed into a box (h, w), as a data set yields them.

        With TTA these are the log of the averaged probabilities. `segkit.data.geometry.restore_logits`
        brings them to each image's original size.
        """
        return self.box_uncertainty(boxed, mode, tta, crop_size, stride)[0]

    def box_uncertainty(
        self, boxed: torch.Tensor, mode: str = "auto", tta: bool | Mapping[str, Any] | None = False,
        crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None,
        method: str = "softmax", mc_samples: int = DEFAULT_MC_SAMPLES,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`box_logits` and, for method tta_variance / mc_dropout (segkit/inference/uncertainty.py), the
        variance map (B, h, w) of the samples, whose mean probabilities the scores then are (as logs)."""
        if mode not in MODES:
            raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "auto":
            mode = self.geometry.mode
        window = crop_size or self.geometry.window or self.geometry.image_size
        scales, flip = tta_settings(tta)
        check_method(method, scales, flip, mc_samples)  # before any work
        images = to_model_input(boxed, self.device, self.channels_last)
        with self.autocast():
            if method == "softmax":
                return predict_logits(self.model, images, mode, window, stride, scales, flip), None
            probs, variance = sampled_probs(self.model, images, method, mode, window, stride, scales, flip,
                                            mc_samples)
            return probs_to_logits(probs), variance

    def uncertainty(
        self, images: ImageLike, method: str = "softmax", mc_samples: int = DEFAULT_MC_SAMPLES, mode: str = "auto",
        tta: bool | Mapping[str, Any] | None = False, crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None, test_size: Sequence[int] | None = None,
    ) -> Uncertainty:
        """Probabilities (B, C, H, W) at the images' own size and, unless method=softmax, the variance (B, H, W).

        method: softmax | tta_variance (the TTA views' spread; needs tta) | mc_dropout (`mc_samples` passes
        with dropout sampling). `.maps()` gives confidence, entropy and variance. The letterbox, the
        prediction and the resizing back are those of `logits`; the variance is resized back like the scores.
        """
        batch, _ = to_batch(images)
        box = test_size or self.geometry.image_size
        boxed = letterbox_images(batch.to(self.device), box)
        scores, variance = self.box_uncertainty(boxed, mode, tta, crop_size, stride, method, mc_samples)
        size = batch.shape[-2:]
        probs = restore_logits(scores, size).float().softmax(1)
        if variance is not None:
            variance = restore_logits(variance[:, None], size)[:, 0].clamp(0, 1)
        return Uncertainty(probs, variance)

    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        return_logits: bool = False,
        mode: str = "auto",
        tta: bool | Mapping[str, Any] | None = False,
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        test_size: Sequence[int] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Class ids (H, W) int64 for one image, (B, H, W) for a batch tensor, a list for a list.

        Each image is brought to the training scale, predicted, and its scores resized back to
        its own size (H, W) before the argmax. With `return_logits=True` the scores (C, H, W) /
        (B, C, H, W) come back instead. Results are on the CPU.
        """
        if isinstance(images, (list, tuple)):
            return [cast(torch.Tensor, self.predict(image, return_logits, mode, tta, crop_size, stride, test_size))
                    for image in images]
        batch, single = to_batch(images)
        scores = self.logits(batch, mode, tta, crop_size, stride, test_size).float().cpu()
        out = scores if return_logits else scores.argmax(1)
        return out[0] if single else out


class Ensemble:
    """Several predictors whose probabilities are averaged, each run with its own training geometry."""

    def __init__(self, predictors: Sequence[Predictor]) -> None:
        if not predictors:
            raise ConfigError("checkpoint", "no checkpoint given")
        first = predictors[0]
        for other in predictors[1:]:
            if other.class_names != first.class_names:
                raise ConfigError("checkpoint", f"{other.source}: classes {other.class_names} differ from "
                                  f"{first.source}: {first.class_names}; an ensemble needs the same classes")
        self.predictors = list(predictors)
        self.num_classes = first.num_classes
        self.colors = first.colors

    @classmethod
    def load(cls, paths: str | Path | Sequence[str | Path], device: str | torch.device | None = "auto",
             trust: bool = False) -> Ensemble:
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        return cls([load(path, device, trust=trust) for path in paths])

    def probabilities(self, images: torch.Tensor, **options: Any) -> torch.Tensor:
        """Mean softmax probabilities (B, C, H, W) at the images' size; options as `Predictor.probabilities`."""
        total: torch.Tensor | None = None
        for predictor in self.predictors:
            probs = predictor.probabilities(images, **options).float().cpu()
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(self.predictors)

    def uncertainty(self, images: torch.Tensor, method: str = "softmax", mc_samples: int = DEFAULT_MC_SAMPLES,
                    **options: Any) -> Uncertainty:
        """Mean probabilities over the members (on the CPU) and, unless method=softmax, the variance of all
        their samples pooled: the mean of the members' variances plus the variance of their means (each
        member takes the same number of samples, so the law of total variance holds as is)."""
        if method == "softmax":
            return Uncertainty(self.probabilities(images, **options))
        means, within = Moments(), None
        for predictor in self.predictors:
            member = predictor.uncertainty(images, method, mc_samples, **options)
            means.add(member.probs.float().cpu())
            assert member.variance is not None  # method is not softmax: the member sampled
            variance = member.variance.cpu()
            within = variance if within is None else within + variance
        assert within is not None
        return Uncertainty(means.mean(), (within / len(self.predictors) + means.variance()).clamp(0, 1))


def to_batch(image: ImageLike) -> tuple[torch.Tensor, bool]:
    """Any supported image -> ((B, 3, H, W) uint8, or float in [0, 1], whether it was a single image).

    uint8 stays uint8, so the letterbox rounds exactly as the data set's does in training.
    """
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


def load(path: str | Path, device: str | torch.device | None = "auto", trust: bool = False) -> Predictor:
    """Rebuild the model from a segkit checkpoint (`best.pt` / `last.pt`) and load its weights.

    `best.safetensors` (from `segkit-export format=safetensors`) is read with the `best.yaml` beside it.
    Only tensors and plain values are read, and the stored config may only build segkit's own model
    and data set code; anything else is refused before it is called. `trust=True` skips that check
    for a file whose author you trust (a model built by your own code)."""
    return from_record(read_checkpoint(path, trust=trust), device)


def from_record(record: CheckpointRecord, device: str | torch.device | None = "auto") -> Predictor:
    """A predictor for a checkpoint already read (segkit.runs.checkpoint.read_checkpoint)."""
    target = resolve_device(device)
    return Predictor(rebuild_model(record).to(target), record.config, target, source=str(record.path),
                     geometry=record.geometry, class_names=record.class_names)


def rebuild_model(record: CheckpointRecord) -> Segmenter:
    """The model as trained, with the record's weights and temperature (no pretrained weights downloaded)."""
    model = build(record.config.model, "model")
    if record.private:
        from segkit.engine.privacy import make_model_private_compatible

        model = make_model_private_compatible(model)
    record.load_into(model)
    model.temperature = record.temperature
    return model
