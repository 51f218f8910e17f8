"""Scan a whole data set before training: every problem as one line naming its file, plus statistics.

Training stops at the first bad sample (or skips it with `on_error=skip`); this scan reads
every sample of every split through the same reader the trainer uses, so what it reports is
exactly what training would trip over, all at once: missing partners, duplicate stems,
unreadable, empty or truncated files, RGB masks without a colour table, size mismatches, mask
values outside the format's value table (each file with its values and pixel counts); for
annotation files (COCO), every defect of every image and annotation
(`SegmentationDataset.label_problems`). The reader classifies each finding
(segkit.data.readers.base.classify): errors stop training, warnings (a mask without an image,
a mask with no labelled pixel, a JPEG mask, unknown values under dataset.unknown_labels=ignore)
are logged by training and listed here with the same words. Problems carry a kind, so the
report can count them per kind.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from segkit import safe_files
from segkit.config import build
from segkit.data.class_balance import median_frequency_weights
from segkit.data.geometry import letterbox
from segkit.data.readers.base import Problem, ProblemsError, SegmentationDataset, plural
from segkit.errors import DataError
from segkit.reporting.plots import save_overlay_preview, stable_palette


@dataclass
class SplitReport:
    split: str
    samples: int = 0
    readable: int = 0  # samples without a problem, which the statistics cover
    problems: list[str] = field(default_factory=list)
    pixel_counts: np.ndarray | None = None  # (num_classes,) valid pixels per class
    ignore_pixels: int = 0
    presence: np.ndarray | None = None  # (num_classes,) images containing each class
    dataset: SegmentationDataset | None = None
    readable_indices: list[int] = field(default_factory=list)  # the samples the statistics cover
    sample_problems: dict[int, list[str]] = field(default_factory=dict)  # index -> that sample's problems


def check_split(dataset_cfg: DictConfig, split: str) -> SplitReport:
    """Read every sample of one split; collect problems and class statistics."""
    report = SplitReport(split)
    with _quiet("segkit.data"):  # every finding is listed here; the readers' log lines would repeat them
        try:
            dataset = build(dataset_cfg, "dataset", split=split, on_error="skip")
        except DataError as error:  # several at once when the reader found them all (ProblemsError)
            report.problems += getattr(error, "problems", [str(error)])
            return report
        report.dataset = dataset
        report.samples = len(dataset)
        report.problems += dataset.layout_problems + dataset.unused_files
        report.pixel_counts = np.zeros(dataset.num_classes, dtype=np.int64)
        report.presence = np.zeros(dataset.num_classes, dtype=np.int64)
        for index in range(len(dataset)):
            found = check_sample(dataset, index, report)
            report.problems += found
            if found:
                report.sample_problems[index] = found
    return report


def check_sample(dataset: SegmentationDataset, index: int, report: SplitReport) -> list[str]:
    """The sample's problems (one line each, naming the file); statistics are added when it reads.

    The lines and their classification are the reader's, as training meets them: errors raised
    by reading, and the warnings it noted (`SegmentationDataset.findings`).
    """
    labels = dataset.label_problems(index)  # all of them; reading would stop at the first error
    if any(not problem.warning for problem in labels):
        return list(labels)
    try:
        image, mask = dataset.read(index)
        if image.shape[-2:] != mask.shape:
            raise ProblemsError([dataset.size_problem(index, tuple(image.shape[-2:]), tuple(mask.shape))])
        mask = dataset.check_mask_values(mask, index)
    except DataError as error:
        return [*labels, *_noted(dataset, index), *getattr(error, "problems", [str(error)])]
    labels = [*labels, *_noted(dataset, index)]
    ignored = mask == dataset.ignore_index
    counts = torch.bincount(mask[~ignored], minlength=dataset.num_classes).numpy()
    assert report.pixel_counts is not None and report.presence is not None  # the caller's zeros
    report.pixel_counts += counts
    report.presence += counts > 0
    report.ignore_pixels += int(ignored.sum())
    report.readable += 1
    report.readable_indices.append(index)
    return list(labels)


def _noted(dataset: SegmentationDataset, index: int) -> list[Problem]:
    return list(dataset.findings.pop(index, {}).values())


def is_warning(problem: str) -> bool:
    return bool(getattr(problem, "warning", False))


def problem_kinds(problems: Sequence[str]) -> Counter:
    """How many problems of each kind (problems without one count as "other")."""
    return Counter(getattr(problem, "kind", "other") for problem in problems)


def summary_lines(report: SplitReport) -> list[str]:
    """Class pixel frequencies and per-image presence, one row per class."""
    dataset = report.dataset
    if dataset is None or report.pixel_counts is None or report.presence is None:
        return [f"{report.split}: not readable"]
    total = int(report.pixel_counts.sum()) + report.ignore_pixels
    warnings = sum(map(is_warning, report.problems))
    counts = (f"{plural(report.samples, 'sample')}, {report.readable} readable, "
              f"{plural(len(report.problems) - warnings, 'error')}, {plural(warnings, 'warning')}")
    lines = [f"{report.split}: {counts}",
             f"  {'id':>3} {'class':<20} {'pixels':>8} {'images':>12}"]
    width = len(str(report.readable))
    for i, name in enumerate(dataset.class_names):
        share = 100 * report.pixel_counts[i] / max(total, 1)
        images = int(report.presence[i])
        percent = 100 * images / max(report.readable, 1)
        lines.append(f"  {i:>3} {name[:20]:<20} {share:7.2f}% {images:>{width}} ({percent:3.0f}%)")
        if images == 0:
            lines[-1] += "  <- never present"
    lines.append(f"  {'':>3} {'ignore':<20} {100 * report.ignore_pixels / max(total, 1):7.2f}%")
    return lines


def class_weights(report: SplitReport) -> list[float]:
    return median_frequency_weights(torch.from_numpy(report.pixel_counts))


def write_weights(path: str | Path, report: SplitReport) -> list[float]:
    """YAML with `class_weights` (and the names), for loss.class_weights."""
    weights = class_weights(report)
    names = report.dataset.class_names if report.dataset else []
    listed = json.dumps(weights)  # JSON lists are YAML flow sequences, and safe for any class name
    text = (
        f"# Median-frequency class weights of {report.dataset.name if report.dataset else '?'} "
        f"({report.split} split, {report.samples} samples); absent classes get 0.\n"
        f"# Use: python train.py 'loss.class_weights={listed}'  (loss=ce_dice: loss.terms.ce.class_weights)\n"
        f"class_names: {json.dumps(names)}\n"
        f"class_weights: {listed}\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safe_files.write_text(path, text)
    return weights


def write_preview(path: str | Path, report: SplitReport, count: int = 8, tile: int = 256) -> Path | None:
    """A grid of evenly spaced readable samples with their masks overlaid and a legend."""
    dataset = report.dataset
    if dataset is None or len(dataset) == 0:
        return None
    samples = []
    for index in _spread(len(dataset), count * 2):
        try:
            image, mask = dataset.read(index)
        except DataError:
            continue
        if image.shape[-2:] != mask.shape:
            continue
        height, width = mask.shape
        scale = tile / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image, mask = letterbox(image, mask, size, dataset.ignore_index)
        samples.append((image.permute(1, 2, 0).numpy(), mask.numpy()))
        if len(samples) == count:
            break
    if not samples:
        return None
    palette = stable_palette(dataset.num_classes, dataset.colors)
    return save_overlay_preview(path, samples, dataset.class_names, palette, dataset.ignore_index)


def _spread(length: int, count: int) -> list[int]:
    if length <= count:
        return list(range(length))
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Layout problems are reported by the check itself; silence the reader's own warnings."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

