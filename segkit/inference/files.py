"""Predict a set of image files: find them, read them safely, write masks, overlays, probabilities and
uncertainty maps (what `segkit-predict` runs)."""

from __future__ import annotations

import glob
import logging
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader, Dataset

from segkit import safe_files
from segkit.data.io import IMAGE_SUFFIXES
from segkit.errors import ConfigError, DataError
from segkit.inference.predictor import Ensemble, tta_option, tta_settings
from segkit.inference.uncertainty import check_method, check_model, to_grey
from segkit.models.sliding import MODES, clean_mask
from segkit.reporting.plots import overlay, save_mask_png, save_png, stable_palette

log = logging.getLogger("segkit")


def find_inputs(spec: str) -> list[Path]:
    """A file, the image files of a directory (sorted), or whatever a glob matches (sorted)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError("input", f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not matches:
        raise ConfigError("input", f"{spec}: no such file or directory, and the glob matches nothing")
    return matches


def output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique (`a`, `a_1`) when a glob spans directories."""
    seen: dict[str, int] = defaultdict(int)
    stems = []
    for path in paths:
        count = seen[path.stem]
        seen[path.stem] += 1
        stems.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return stems


def read_rgb(path: Path, max_pixels: int) -> torch.Tensor:
    """uint8 (3, H, W); a decompression bomb or a non-image raises DataError naming the file.

    `max_pixels` replaces Pillow's global limit for this read only (checked on the header,
    before anything is decoded), so other code in the process keeps Pillow's default.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise DataError(f"{path}: {width}x{height} pixels is more than max_pixels={max_pixels} "
                                    "(decompression bomb?); raise max_pixels if the image is genuine")
                array = np.asarray(img.convert("RGB"))
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(f"{path}: refused as a decompression bomb ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for non-images and broken files
        raise DataError(f"{path}: not a readable image ({str(error).splitlines()[0]})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ImageFiles(Dataset):
    """Yields (index, image or the one-line reason it could not be read): failures travel as data."""

    def __init__(self, paths: Sequence[Path], max_pixels: int) -> None:
        self.paths = list(paths)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        try:
            return index, read_rgb(self.paths[index], self.max_pixels)
        except DataError as error:
            return index, str(error)


def predict_into(out: Path, cfg: DictConfig) -> int:
    if cfg.mode not in MODES:
        raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    paths = find_inputs(str(cfg.input))
    check_method(cfg.uncertainty_method, *tta_settings(tta_option(cfg)), int(cfg.mc_samples))
    ensemble = Ensemble.load(cfg.checkpoint, cfg.device, trust=bool(cfg.trust_checkpoint))
    for predictor in ensemble.predictors:  # mc_dropout on a model without dropout: one line, before any file
        check_model(predictor.model, cfg.uncertainty_method)
    options = {"mode": cfg.mode, "tta": tta_option(cfg), "crop_size": cfg.crop_size, "stride": cfg.stride,
               "test_size": cfg.test_size}
    out.mkdir(parents=True, exist_ok=True)
    safe_files.refuse_links(out)  # masks, overlays and maps below are written by PIL / numpy
    stems = output_stems(paths)
    palette = stable_palette(ensemble.num_classes, ensemble.colors)
    loader = DataLoader(ImageFiles(paths, int(cfg.max_pixels)), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, collate_fn=list)
    console = Console(stderr=True)
    failed = 0
    with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not cfg.progress_bar) as progress:
        task = progress.add_task("predict", total=len(paths))
        for batch in loader:
            groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = defaultdict(list)
            for index, item in batch:
                if isinstance(item, str):
                    console.print(f"skipped: {item}", markup=False, highlight=False, soft_wrap=True)
                    failed += 1
                else:
                    groups[tuple(item.shape)].append((index, item))
            for members in groups.values():
                images = torch.stack([image for _, image in members])
                result = ensemble.uncertainty(images, cfg.uncertainty_method, int(cfg.mc_samples), **options)
                maps = result.maps() if cfg.uncertainty else {}
                for i, (index, image) in enumerate(members):
                    write_outputs(out, stems[index], image, result.probs[i], palette, cfg,
                                  {name: values[i] for name, values in maps.items()})
            progress.advance(task, len(batch))
    done = len(paths) - failed
    print(f"predicted {done} image(s) -> {out}" + (f"; {failed} file(s) failed" if failed else ""))
    return failed


def write_outputs(out: Path, stem: str, image: torch.Tensor, prob: torch.Tensor, palette: np.ndarray,
                  cfg: DictConfig, maps: Mapping[str, torch.Tensor] | None = None) -> None:
    """The mask and whatever else cfg asks for; `maps` (H, W) in [0, 1] by name go to <name>/<stem>.png."""
    mask = prob.argmax(0).numpy()
    if cfg.min_region or cfg.max_hole:
        mask = clean_mask(mask, min_region=int(cfg.min_region), max_hole=int(cfg.max_hole))
    save_mask_png(mask, out / f"{stem}.png")
    if cfg.overlay:
        save_png(overlay(image, mask, palette), out / "overlay" / f"{stem}.png")
    if cfg.probabilities:
        probs = prob.numpy().astype(np.float16)
        safe_files.write_with(out / "probs" / f"{stem}.npy", lambda buffer: np.save(buffer, probs))
    # 8-bit greyscale, 255 = confidence 1 / entropy 1 / the largest possible variance (inference/uncertainty.py)
    for name, values in (maps or {}).items():
        save_png(to_grey(values).cpu().numpy(), out / name / f"{stem}.png")
