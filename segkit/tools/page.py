"""`segkit-check-data ... page=<dir>`: the checked data set as a static page to browse (index.html).

Every readable sample of every checked split gets three pictures, drawn in a process pool: a thumbnail
with its mask overlaid in the stable class colours (segkit.reporting.plots), the image for the detail view
(downscaled to page_image_size, never upscaled) and its mask as a PNG in the class colours, transparent where
ignored, which the page lays over the image with an opacity slider. The page itself, its data and its
script are written by segkit.reporting.dataset_page. Every file goes through segkit.safe_files: never through
a link planted in the folder; the pictures skip the fsync, since a run can draw them again.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segkit import safe_files
from segkit.data.readers.base import SegmentationDataset
from segkit.engine.progress import Progress
from segkit.engine.threads import usable_cores
from segkit.errors import ConfigError, DataError
from segkit.reporting.dataset_page import (
    IMAGES,
    MASKS,
    THUMBS,
    Finding,
    PageHeader,
    PageImage,
    SplitSummary,
    sample_path,
    split_folders,
    write_page,
)
from segkit.reporting.plots import overlay_mask, stable_palette, to_hwc
from segkit.tools.checks import SplitReport, is_warning

MAX_WORKERS = 32
THUMB_ALPHA = 0.5
JPEG_QUALITY = 88


def check_options(thumb_size: Any, image_size: Any, workers: Any) -> None:
    """The page's keys, each named when wrong."""
    for key, value in (("page_thumb_size", thumb_size), ("page_image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(key, f"must be a positive number of pixels, got {value!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError("page_workers", f"must be 0 (one per usable core) or a number of processes, got {workers!r}")


def page_workers(requested: int, jobs: int) -> int:
    """Processes to draw `jobs` samples: `requested`, or for 0 one per usable core (at most MAX_WORKERS)."""
    workers = requested or min(usable_cores(), MAX_WORKERS)
    return max(1, min(workers, jobs))


def prepare_folder(page_dir: Path) -> Path:
    """The page's folder, created; a symlink or something that is not a folder is refused (written before)."""
    page_dir = Path(os.path.abspath(page_dir))
    try:
        info = os.lstat(page_dir)
    except FileNotFoundError:
        page_dir.mkdir(parents=True)
        return page_dir
    if stat.S_ISLNK(info.st_mode):
        raise safe_files.UnsafePathError(f"page={page_dir}: is a symlink; refused: the page is written only into "
                                         "a plain folder. Remove it or choose another folder")
    if not stat.S_ISDIR(info.st_mode):
        raise safe_files.UnsafePathError(f"page={page_dir}: exists and is not a folder; choose another folder")
    return page_dir


@dataclass(frozen=True)
class Drawing:
    """What a worker needs to draw one split's samples (pickled once per worker)."""

    dataset: SegmentationDataset
    folder: str  # the split's folder under thumbs/, images/, masks/
    root: str | None  # the data set's root, for short file names


@dataclass(frozen=True)
class Job:
    split: str
    index: int


_drawings: dict[str, Drawing] = {}
_settings: dict[str, Any] = {}


def _start(drawings: dict[str, Drawing], settings: dict[str, Any]) -> None:
    """A worker's (or this process's) state: the data sets by split and the page's sizes and palette."""
    logging.getLogger("segkit.data").setLevel(logging.ERROR)  # the check listed every finding already
    _drawings.clear()
    _drawings.update(drawings)
    _settings.clear()
    _settings.update(settings)


def sample_name(dataset: SegmentationDataset, index: int, root: str | None) -> str:
    """The sample's image file, relative to the data set's root when below it; its description otherwise."""
    image = dataset.sample_files(index).get("image")
    if image is None:
        return dataset.describe(index)
    if root:
        try:
            return Path(os.path.abspath(image)).relative_to(os.path.abspath(root)).as_posix()
        except ValueError:
            pass
    return str(image)


def _resized(array: np.ndarray, longest: int, resample: Image.Resampling) -> Image.Image:
    picture = Image.fromarray(array)
    scale = longest / max(picture.size)
    if scale >= 1:
        return picture
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, resample)


def _encoded(picture: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        picture.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        picture.save(buffer, format=image_format, optimize=False)
    return buffer.getvalue()


def _labels(mask: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Class ids with ignored and unknown values as ignore_index."""
    valid = (mask >= 0) & (mask < num_classes) & (mask != ignore_index)
    return np.where(valid, mask, ignore_index)


def draw_sample(job: Job) -> PageImage | None:
    """Read one sample and write its three pictures; None when it no longer reads."""
    drawing = _drawings[job.split]
    dataset = drawing.dataset
    page_dir, palette = Path(_settings["page_dir"]), _settings["palette"]
    try:
        image, mask = dataset.read(job.index)
        if image.shape[-2:] != mask.shape:
            return None
        mask = dataset.check_mask_values(mask, job.index)
    except DataError:
        return None
    finally:
        dataset.findings.pop(job.index, None)
    pixels = to_hwc(image)
    labels = _labels(mask.numpy(), dataset.num_classes, dataset.ignore_index)
    ignored = labels == dataset.ignore_index
    counts = np.bincount(labels[~ignored].ravel(), minlength=dataset.num_classes)

    path = sample_path(drawing.folder, job.index)
    full = _resized(pixels, _settings["image_size"], Image.Resampling.BILINEAR)
    ids = np.asarray(_resized(labels.astype(np.int32), _settings["image_size"], Image.Resampling.NEAREST))
    coloured = np.zeros((*ids.shape, 4), dtype=np.uint8)
    shown = ids != dataset.ignore_index
    coloured[shown, :3] = palette[ids[shown]]
    coloured[shown, 3] = 255
    thumb = _resized(pixels, _settings["thumb_size"], Image.Resampling.BILINEAR)
    thumb_ids = np.asarray(Image.fromarray(labels.astype(np.int32)).resize(thumb.size, Image.Resampling.NEAREST))
    thumb = Image.fromarray(overlay_mask(np.asarray(thumb), thumb_ids, palette, dataset.ignore_index, THUMB_ALPHA))
    for folder, picture, suffix, image_format in ((THUMBS, thumb, "jpg", "JPEG"), (IMAGES, full, "jpg", "JPEG"),
                                                  (MASKS, Image.fromarray(coloured, "RGBA"), "png", "PNG")):
        safe_files.write_bytes(page_dir / folder / f"{path}.{suffix}", _encoded(picture, image_format),
                               root=page_dir, sync=False)
    return PageImage(
        split=job.split, index=job.index, name=sample_name(dataset, job.index, drawing.root),
        width=int(pixels.shape[1]), height=int(pixels.shape[0]), path=path,
        pixels={i: int(c) for i, c in enumerate(counts) if c}, ignore=int(ignored.sum()),
    )


def _draw_all(jobs: Sequence[Job], workers: int, drawings: dict[str, Drawing], settings: dict[str, Any],
              advance: Callable[[], None]) -> list[PageImage]:
    """Every job's picture record, in job order; one process draws them when `workers` is 1."""
    results: Iterable[PageImage | None]
    if workers == 1:
        _start(drawings, settings)
        results = map(draw_sample, jobs)
        return [image for image in _counted(results, advance) if image is not None]
    context = multiprocessing.get_context("spawn")  # no copy of this process's threads and locks (torch)
    chunk = max(1, min(32, len(jobs) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start, initargs=(drawings, settings)) as pool:
        results = pool.map(draw_sample, jobs, chunksize=chunk)
        return [image for image in _counted(results, advance) if image is not None]


def _counted(results: Iterable[PageImage | None], advance: Callable[[], None]) -> Iterator[PageImage | None]:
    for result in results:
        advance()
        yield result


def write_dataset_page(
    page_dir: str | Path, reports: Sequence[SplitReport], dataset_cfg: Any, *, thumb_size: int = 192,
    image_size: int = 1024, workers: int = 0, progress_bar: bool = True,
) -> Path:
    """Draw every readable sample of `reports` (segkit.tools.checks.check_split) into `page_dir`; the page's
    index.html."""
    check_options(thumb_size, image_size, workers)
    page_dir = prepare_folder(Path(page_dir))
    readable = [report for report in reports if report.dataset is not None]
    first = readable[0].dataset if readable else None
    class_names = first.class_names if first else [str(n) for n in dataset_cfg.get("class_names") or []]
    num_classes = first.num_classes if first else len(class_names)
    colors = first.colors if first and first.colors is not None else dataset_cfg.get("colors")
    palette = stable_palette(num_classes, colors)
    root = dataset_cfg.get("root")
    folders = split_folders([report.split for report in reports])
    drawings = {report.split: Drawing(report.dataset, folders[report.split], str(root) if root else None)
                for report in readable if report.dataset is not None}
    jobs = [Job(report.split, index) for report in readable for index in report.readable_indices]
    settings = {"page_dir": str(page_dir), "palette": palette, "thumb_size": thumb_size, "image_size": image_size}

    bar = Progress(len(jobs), "page images", enabled=progress_bar and bool(jobs))
    try:
        images = _draw_all(jobs, page_workers(workers, len(jobs)), drawings, settings, lambda: bar.advance(1))
    finally:
        bar.close()

    header = PageHeader(
        title=first.name if first else str(dataset_cfg.get("name", "data set")), root=str(root) if root else None,
        class_names=class_names, palette=palette, thumb_size=thumb_size,
        details={"classes": str(num_classes), "ignore_index": str(dataset_cfg.get("ignore_index"))},
    )
    return write_page(page_dir, header, [_summary(report) for report in reports], images, _findings(reports))


def _summary(report: SplitReport) -> SplitSummary:
    warnings = sum(map(is_warning, report.problems))
    return SplitSummary(
        split=report.split, samples=report.samples, readable=report.readable,
        errors=len(report.problems) - warnings, warnings=warnings,
        pixel_counts=None if report.pixel_counts is None else [int(v) for v in report.pixel_counts],
        presence=None if report.presence is None else [int(v) for v in report.presence],
        ignore_pixels=report.ignore_pixels,
    )


def _findings(reports: Sequence[SplitReport]) -> list[Finding]:
    """Every problem of the check, each with the sample it belongs to where the check read it for one."""
    findings = []
    for report in reports:
        owner = {id(problem): index for index, problems in report.sample_problems.items() for problem in problems}
        findings += [Finding(report.split, str(problem), is_warning(problem), owner.get(id(problem)))
                     for problem in report.problems]
    return findings
