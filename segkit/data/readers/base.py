"""The dataset contract every reader follows, and the fixed-size step that makes batches possible."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from segkit import safe_files
from segkit.data.geometry import letterbox
from segkit.data.io import user_cache_dir
from segkit.errors import ConfigError, DataError, SegkitError

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
UNKNOWN_LABELS = ("error", "ignore")

# The kinds of finding whose severity depends on the data set's options; every other kind is what its
# reader says (Problem.warning). segkit-check-data and training both classify through `classify`, so a
# finding is an error (training stops, or leaves the sample out with on_error=skip) or a warning
# (training logs it and goes on) in both, in the same words.
WARNING_KINDS = {"mask without image", "no labelled pixel", "JPEG mask"}


def classify(text: str, kind: str, *, unknown_labels: str = "error") -> Problem:
    """One finding, tagged error or warning by the one rule the check and training share."""
    if kind == "unknown values":
        return Problem(text, kind, warning=unknown_labels == "ignore")
    return Problem(text, kind, warning=kind in WARNING_KINDS)


def plural(count: int, noun: str) -> str:
    """'1 problem', '2 problems', '0 problems'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass(frozen=True)
class ValueTable:
    """The mask values a format defines: what they are called, the fix for others, the conventions applied.

    `values` completes "values outside ..." (e.g. "the Cityscapes label ids 0..33"); `fix` is a change
    that exists for the format (a key it has, or "the file is wrong"); `after` names the conventions that
    turn file values into ignore ("after reduce_zero_label"), for masks left without a labelled pixel;
    `colors`: the raw values are RGB colours packed as r << 16 | g << 8 | b.
    """

    values: str
    fix: str
    after: str = ""
    colors: bool = False

    def show(self, value: int) -> str:
        return str([value >> 16, value >> 8 & 255, value & 255]) if self.colors else str(value)


def out_of_range(mask: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Where a mask of class ids holds neither a class id 0..num_classes-1 nor ignore_index."""
    return ((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)


class SegmentationDataset(Dataset):
    """A split of a data set yielding (uint8 image (3, H, W), int64 mask (H, W)) at `image_size`.

    Subclasses implement `__len__`, `read(index)` (native size) and `describe(index)` (the file
    names, for error messages). This class letterboxes every sample to `image_size` so that
    any batch can be stacked, and checks the mask values so a wrong `num_classes` or a missing
    remap is reported with its file at the first bad sample, inside the worker that read it.

    `on_error="skip"` replaces a sample that fails (any DataError: unreadable file, size
    mismatch, bad mask values) by the next readable index, logs a warning naming the file and
    counts it in `skipped`; readers also keep going past layout problems (`layout_problems`).
    Mask values outside the format's value table (`value_table`, set by each reader) are refused
    with one line naming the file, the values and their pixel counts; `unknown_labels="ignore"`
    maps them to ignore_index instead, and each file is logged once per process with a count.
    A mask with no labelled pixel (after the format's conventions) is a warning, logged the same
    way; `skip_unlabelled=True` reads every mask when the data set is built and leaves those out.

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
        unknown_labels: str = "error",
        skip_unlabelled: bool = False,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ConfigError("dataset.on_error", f"must be raise or skip, got {on_error!r}")
        if cache not in CACHE_MODES:
            raise ConfigError("dataset.cache", f"must be false, true or device, got {cache!r}")
        if unknown_labels not in UNKNOWN_LABELS:
            raise ConfigError("dataset.unknown_labels", f"must be error or ignore, got {unknown_labels!r}")
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
        self.unknown_labels = unknown_labels
        self.skip_unlabelled = skip_unlabelled
        self.value_table = ValueTable(
            f"the class ids 0..{num_classes - 1} and ignore_index {ignore_index}", "the file is wrong")
        self.findings: dict[int, dict[str, Problem]] = {}  # warnings met while reading, per sample (this process)
        self.finding_counts: Counter[str] = Counter()
        self._scanning = False  # leave_out_unlabelled reports what it finds itself
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
                mask = self.check_mask_values(self.read_native_mask(candidate), candidate)
            except DataError:
                if self.on_error == "raise":
                    raise
                continue
            if self._native_masks is not None:
                small = max(self.num_classes - 1, self.ignore_index) <= 255
                self._native_masks[candidate] = mask.to(torch.uint8) if small else mask
            return mask.long()
        raise DataError(f"{self.name}[{self.split}]: every mask failed to read ({plural(len(self), 'mask')})")

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

    def finding(self, text: str, kind: str) -> Problem:
        """A finding of this data set, classified by `classify` with its options."""
        return classify(text, kind, unknown_labels=self.unknown_labels)

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
        raise DataError(f"{self.name}[{self.split}]: every sample failed to read ({plural(len(self), 'sample')})")

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is not None and index in self._cache:
            image, mask = self._cache[index]
            return image, mask.long()
        image, mask = self.read(index)
        if image.shape[-2:] != mask.shape:
            raise ProblemsError([self.size_problem(index, tuple(image.shape[-2:]), tuple(mask.shape))])
        mask = self.check_mask_values(mask, index)
        image, mask = letterbox(image, mask, self.image_size, self.ignore_index)
        if self._cache is not None:
            # uint8 masks (when every id fits) keep the cache at 4 bytes per pixel instead of 11.
            small = mask.to(torch.uint8) if max(self.num_classes - 1, self.ignore_index) <= 255 else mask
            self._cache[index] = (image, small)
        return image, mask

    def size_problem(self, index: int, image_size: tuple[int, ...], mask_size: tuple[int, ...]) -> Problem:
        files = self.sample_files(index)
        image = f" ({files['image'].name})" if "image" in files else ""
        return self.finding(f"{self.describe(index)}: size mismatch, mask {mask_size} vs image {image_size}{image}; "
                            "fix: the file is wrong (the mask of another image, or resized)", "size mismatch")

    def check_mask_values(self, mask: torch.Tensor, index: int) -> torch.Tensor:
        """The mask with values outside [0, num_classes) and ignore_index settled (see `settle`)."""
        return self.settle(index, mask, mask, out_of_range(mask, self.num_classes, self.ignore_index))

    def settle(self, index: int, raw: torch.Tensor, ids: torch.Tensor, unknown: torch.Tensor,
               table: ValueTable | None = None) -> torch.Tensor:
        """Class ids of a mask whose `unknown` pixels held values outside the value table (`raw`: the file's).

        Unknown values are refused (ProblemsError naming the file, the values and their pixel counts)
        or, with unknown_labels=ignore, mapped to ignore_index and noted; a mask left with no
        labelled pixel is noted. Noted findings are warnings, logged once per sample and process.
        """
        table = table or self.value_table
        if bool(unknown.any()):
            problem = self.unknown_values_problem(index, raw[unknown], table)
            if not problem.warning:
                raise ProblemsError([problem])
            ids = ids.clone()
            ids[unknown] = self.ignore_index
            self.note(index, problem)
        if ids.numel() and not bool((ids != self.ignore_index).any()):
            self.note(index, self.unlabelled_problem(index, ids.numel(), table))
        return ids

    def unknown_values_problem(self, index: int, values: torch.Tensor, table: ValueTable) -> Problem:
        found, counts = torch.unique(values, return_counts=True)
        order = counts.argsort(descending=True, stable=True)[:8]
        listed = ", ".join(f"{table.show(int(found[i]))} ({plural(int(counts[i]), 'pixel')})"
                           for i in sorted(order.tolist(), key=lambda i: int(found[i])))
        more = f" and {len(found) - len(order)} more" if len(found) > len(order) else ""
        what = "colours" if table.colors else "values"
        text = f"{self.describe(index)}: {what} outside {table.values}: {listed}{more}; "
        if self.unknown_labels == "ignore":
            text += f"mapped to ignore_index {self.ignore_index} (dataset.unknown_labels=ignore)"
        else:
            text += f"fix: {table.fix}, or dataset.unknown_labels=ignore to train with those pixels ignored"
        return self.finding(text, "unknown values")

    def unlabelled_problem(self, index: int, pixels: int, table: ValueTable) -> Problem:
        after = f" {table.after}" if table.after else ""
        text = f"{self.describe(index)}: no labelled pixel, all {plural(pixels, 'pixel')} are ignore{after}; "
        text += ("left out (dataset.skip_unlabelled=true)" if self.skip_unlabelled else
                 "it adds nothing to training; dataset.skip_unlabelled=true leaves such masks out")
        return self.finding(text, "no labelled pixel")

    def note(self, index: int, problem: Problem) -> None:
        """Keep a warning met while reading sample `index` and log it, once per sample and process, counted."""
        seen = self.findings.setdefault(index, {})
        if problem.kind in seen or self._scanning:
            return
        seen[problem.kind] = problem
        self.finding_counts[problem.kind] += 1
        log.warning("%s [%s: %s so far in this process]", problem, problem.kind,
                    plural(self.finding_counts[problem.kind], "file"))

    def leave_out_unlabelled(self) -> None:
        """skip_unlabelled: read every mask now and keep only those with a labelled pixel (`keep_samples`).

        Masks that fail to read are kept: reading them reports the problem (or skips them) as usual.
        What each mask file held is remembered in the user cache (`scan_memo`), by the file's size
        and modification time, so a later run reads only the files that changed.
        """
        if not self.skip_unlabelled:
            return
        memo_path = self.scan_memo()
        memo = _load_memo(memo_path)
        changed = False
        keep, left_out = [], []
        self._scanning = True
        try:
            for index in range(len(self)):
                mask_file = self.sample_files(index).get("mask")
                stamp = _stamp(mask_file) if mask_file is not None and memo_path is not None else None
                entry = memo.get(str(mask_file)) if stamp is not None else None
                if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp:
                    unlabelled = int(entry[2])
                else:
                    try:
                        mask = self.check_mask_values(self.read_native_mask(index), index)
                    except DataError:
                        keep.append(index)
                        continue
                    unlabelled = mask.numel() if mask.numel() and not bool((mask != self.ignore_index).any()) else 0
                    if stamp is not None:
                        memo[str(mask_file)], changed = [*stamp, unlabelled], True
                if unlabelled:
                    left_out.append(self.unlabelled_problem(index, unlabelled, self.value_table))
                else:
                    keep.append(index)
        finally:
            self._scanning = False
            self.findings.clear()
            self.finding_counts.clear()
        if changed:
            _save_memo(memo_path, memo)
        if not left_out:
            return
        total = len(self)
        self.keep_samples(keep)
        self.layout_problems += left_out
        for problem in left_out:
            log.warning("%s", problem)
        log.warning("%s[%s]: left out %d of %s with no labelled pixel (dataset.skip_unlabelled=true)",
                    self.name, self.split, len(left_out), plural(total, "mask"))
        if not keep:
            raise DataError(f"{self.name}[{self.split}]: every mask has no labelled pixel; "
                            "fix: the masks are wrong (see dataset.skip_unlabelled)")

    def scan_settings(self) -> dict | None:
        """Every setting that changes which values a mask file yields (None: scans are not remembered)."""
        return None

    def scan_memo(self) -> Path | None:
        """The file remembering what each mask held under these settings, in the user cache directory."""
        settings = self.scan_settings()
        if settings is None:
            return None
        key = json.dumps({"reader": type(self).__name__, "num_classes": self.num_classes,
                          "ignore_index": self.ignore_index, **settings}, sort_keys=True, default=str)
        return user_cache_dir() / "labels" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def keep_samples(self, indices: Sequence[int]) -> None:
        """Keep only these samples (skip_unlabelled); readers of files implement it."""
        raise ConfigError("dataset.skip_unlabelled", f"{type(self).__name__} cannot leave samples out")


def _stamp(path: Path) -> list[int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def _load_memo(path: Path | None) -> dict[str, list[int]]:
    if path is None:
        return {}
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _save_memo(path: Path | None, memo: dict[str, list[int]]) -> None:
    """Written to a temporary name and renamed; a cache that cannot be written is only a slower next run."""
    if path is None:
        return
    try:
        safe_files.write_text(path, json.dumps(memo))  # a new file renamed over it, never through a link
    except (OSError, SegkitError) as error:
        log.debug("%s: cannot remember the mask scan (%s)", path, error)
