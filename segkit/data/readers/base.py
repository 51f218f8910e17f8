"""The dataset contract every reader follows, and the fixed-size step that makes batches possible."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from segkit.data.geometry import letterbox
from segkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)
ON_ERROR = ("raise", "skip")


class Problem(str):
    """One line naming a file and what is wrong with it, tagged with its kind (counted by segkit-check-data).

    `warning` problems do not stop reading: the sample is used as drawn (e.g. a polygon that
    covers no pixel); the others are errors (raise, or leave the sample out with on_error=skip).
    """

    kind: str
    warning: bool

    def __new__(cls, text: str, kind: str = "other", warning: bool = False) -> Problem:
        problem = super().__new__(cls, text)
        problem.kind, problem.warning = kind, warning
        return problem


class ProblemsError(DataError):
    """Several problems found at once: the message is the first (and how many more); `problems` has them all."""

    def __init__(self, problems: Sequence[str]) -> None:
        more = f" (+{len(problems) - 1} more; segkit-check-data lists them)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}")
        self.problems = list(problems)
CACHE_MODES = (False, True, "device")


class SegmentationDataset(Dataset):
    """A split of a data set yielding (uint8 image (3, H, W), int64 mask (H, W)) at `image_size`.

    Subclasses implement `__len__`, `read(index)` (native size) and `describe(index)` (the file
    names, for error messages). This class letterboxes every sample to `image_size` so that
    any batch can be stacked, and checks the mask values so a wrong `num_classes` or a missing
    remap is reported with its file at the first bad sample, inside the worker that read it.

    `on_error="skip"` replaces a sample that fails (any DataError: unreadable file, size
    mismatch, bad mask values) by the next readable index, logs a warning naming the file and
    counts it in `skipped`; readers also keep going past layout problems (`layout_problems`).
    `cache=True` keeps each letterboxed sample in memory after its first read. DataLoader
    workers are separate processes, so each worker fills its own cache (persistent workers
    keep it across epochs): memory grows to about num_workers x the split's decoded size, and
    a skip count is per process too. `cache="device"` leaves this class uncached: the trainer
    reads every sample once into device tensors (`segkit.data.loading`).
    """

    def __init__(
        self,
        *,
        split: str,
        name: str,
        num_classes: int,
        ignore_index: int,
        image_size: Sequence[int],
        class_names: Sequence[str] | None = None,
        # dataset.mean / std are the model's normalisation (conf/model reads them); the dataset node
        # passes them here too, and a reader has no use for them.
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        on_error: str = "raise",
        cache: bool | str = False,
        gpu_decode: bool = False,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ConfigError("dataset.on_error", f"must be raise or skip, got {on_error!r}")
        if cache not in CACHE_MODES:
            raise ConfigError("dataset.cache", f"must be false, true or device, got {cache!r}")
        if gpu_decode and cache != "device":
            raise ConfigError("dataset.gpu_decode", "needs dataset.cache=device (DataLoader workers cannot use CUDA)")
        self.split = split
        self.name = name
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.on_error = on_error
        self.skipped: dict[int, str] = {}  # index -> why it was replaced (this process only)
        self.layout_problems: list[str] = []  # filled by readers that scan files; see report_layout
        self.unused_files: list[str] = []  # e.g. masks without an image: reported by checks, not fatal
        self.colors: list[list[int]] | None = None  # RGB per class when the data set defines them
        self.cache = cache
        self.gpu_decode = gpu_decode
        self.decode_device: torch.device | None = None  # set by the device cache when gpu_decode is on
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache is True else None
        self._native_masks: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def read_native_mask(self, index: int) -> torch.Tensor:
        """The mask of a sample at its own size; readers with separate mask files read only those."""
        return self.read(index)[1]

    def native_mask(self, index: int) -> torch.Tensor:
        """The untouched mask (H, W) of sample `index` at the image's own size, for native-resolution scores.

        Cached (uint8 when every id fits) when `cache` is on, so validation reads each file once.
        Under on_error=skip a failing sample is replaced by the next readable one, as in `__getitem__`.
        """
        for offset in range(len(self) if self.on_error == "skip" else 1):
            candidate = (index + offset) % len(self)
            if self._native_masks is not None and candidate in self._native_masks:
                return self._native_masks[candidate].long()
            try:
                mask = self.read_native_mask(candidate)
                self.check_mask_values(mask, candidate)
            except DataError:
                if self.on_error == "raise":
                    raise
                continue
            if self._native_masks is not None:
                small = max(self.num_classes - 1, self.ignore_index) <= 255
                self._native_masks[candidate] = mask.to(torch.uint8) if small else mask
            return mask.long()
        raise DataError(f"{self.name}[{self.split}]: all {len(self)} masks failed to read")

    def describe(self, index: int) -> str:
        return f"{self.name}[{self.split}][{index}]"

    def sample_files(self, index: int) -> dict[str, Path]:
        """The files behind a sample ({"image": ..., "mask": ...}) for checks; empty if generated."""
        return {}

    def label_problems(self, index: int) -> list[Problem]:
        """Every defect of a sample's labels that reading it would meet, without decoding it.

        Readers with annotation files (COCO) check them here, so segkit-check-data lists them
        all; readers of mask files have nothing to add to reading the mask.
        """
        return []

    def report_layout(self, problems: Sequence[str]) -> None:
        """Raise the layout problems (on_error=raise) or log them and go on without those files."""
        self.layout_problems = list(problems)
        errors = [p for p in problems if not getattr(p, "warning", False)]
        if errors and self.on_error == "raise":
            raise ProblemsError(errors)
        for problem in problems:
            if getattr(problem, "warning", False):
                log.warning("%s", problem)
            else:
                log.warning("dataset.on_error=skip: leaving out %s", problem)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_error == "raise":
            return self._load(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self.skipped:
                continue
            try:
                return self._load(candidate)
            except DataError as error:
                self.skipped[candidate] = str(error)
                log.warning("dataset.on_error=skip: skipped %s (%d skipped so far in this process)",
                            error, len(self.skipped))
        raise DataError(f"{self.name}[{self.split}]: all {len(self)} samples failed to read")

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is not None and index in self._cache:
            image, mask = self._cache[index]
            return image, mask.long()
        image, mask = self.read(index)
        if image.shape[-2:] != mask.shape:
            raise DataError(
                f"{self.describe(index)}: image size {tuple(image.shape[-2:])} != mask size {tuple(mask.shape)}"
            )
        self.check_mask_values(mask, index)
        image, mask = letterbox(image, mask, self.image_size, self.ignore_index)
        if self._cache is not None:
            # uint8 masks (when every id fits) keep the cache at 4 bytes per pixel instead of 11.
            small = mask.to(torch.uint8) if max(self.num_classes - 1, self.ignore_index) <= 255 else mask
            self._cache[index] = (image, small)
        return image, mask

    def check_mask_values(self, mask: torch.Tensor, index: int) -> None:
        bad = (mask < 0) | ((mask >= self.num_classes) & (mask != self.ignore_index))
        if bad.any():
            values = sorted(mask[bad].unique().tolist())[:8]
            raise DataError(
                f"{self.describe(index)}: mask values {values} are outside [0, {self.num_classes}) "
                f"and not ignore_index={self.ignore_index}; fix dataset.num_classes or map them with dataset.remap"
            )
