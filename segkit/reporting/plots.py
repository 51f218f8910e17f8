"""Drawing helpers: stable class colours, mask overlays, legends, image grids, evaluation charts.

Each function stands alone and takes plain arrays, so reports, previews and loggers can
share them without sharing state. Charts use matplotlib's object API on the Agg canvas: no
display needed and pyplot's global state is never touched.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from segkit import safe_files

# Distinct, readable colours for the first classes; further classes get golden-ratio hues.
_BASE_COLORS = [
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
    (255, 215, 180), (0, 0, 128), (128, 128, 128),
]


def stable_palette(num_classes: int, colors: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(num_classes, 3) uint8: `colors` when given, else a fixed list: class i has one colour in every run."""
    if colors is not None:
        return np.array([list(c)[:3] for c in colors][:num_classes], dtype=np.uint8).reshape(-1, 3)
    palette = [_BASE_COLORS[i] if i < len(_BASE_COLORS) else _hue_color(i) for i in range(num_classes)]
    return np.array(palette, dtype=np.uint8).reshape(-1, 3)


def _hue_color(index: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def overlay_mask(
    image: np.ndarray, mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255, alpha: float = 0.5
) -> np.ndarray:
    """Blend class colours over an (H, W, 3) uint8 image; ignored and unknown ids stay uncoloured."""
    out = image.astype(np.float32)
    valid = (mask >= 0) & (mask < len(palette)) & (mask != ignore_index)
    colours = palette[np.where(valid, mask, 0)].astype(np.float32)
    out[valid] = (1 - alpha) * out[valid] + alpha * colours[valid]
    return out.round().clip(0, 255).astype(np.uint8)


def legend_image(
    names: Sequence[str],
    palette: np.ndarray,
    width: int,
    ids: Sequence[int] | None = None,
    row_height: int = 16,
) -> Image.Image:
    """Colour swatches with class names (only `ids` when given), in as many columns as fit in `width`."""
    font = ImageFont.load_default()
    ids = list(range(len(names))) if ids is None else list(ids)
    column_width = 150
    columns = max(1, width // column_width)
    rows = max(1, (len(ids) + columns - 1) // columns)
    legend = Image.new("RGB", (width, rows * row_height + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for slot, i in enumerate(ids):
        x, y = (slot % columns) * column_width + 4, (slot // columns) * row_height + 2
        color = tuple(int(v) for v in palette[i]) if i < len(palette) else (0, 0, 0)
        draw.rectangle([x, y + 2, x + 12, y + row_height - 3], fill=color, outline=(0, 0, 0))
        name = names[i] if i < len(names) else f"class_{i}"
        draw.text((x + 17, y + 1), f"{i} {name}"[:22], fill=(0, 0, 0), font=font)
    return legend


def image_grid(tiles: Sequence[np.ndarray], columns: int = 4, pad: int = 2) -> Image.Image:
    """(H, W, 3) uint8 tiles of any size, left-to-right in rows, on white."""
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    tile_h = max(t.shape[0] for t in tiles)
    tile_w = max(t.shape[1] for t in tiles)
    grid = Image.new("RGB", (columns * (tile_w + pad) + pad, rows * (tile_h + pad) + pad), (255, 255, 255))
    for i, tile in enumerate(tiles):
        x, y = pad + (i % columns) * (tile_w + pad), pad + (i // columns) * (tile_h + pad)
        grid.paste(Image.fromarray(tile), (x, y))
    return grid


def save_overlay_preview(
    path: str | Path,
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    names: Sequence[str],
    palette: np.ndarray,
    ignore_index: int = 255,
    columns: int = 4,
    alpha: float = 0.5,
) -> Path:
    """A PNG grid of (image, mask) overlays with a legend of the classes shown; returns the path written."""
    tiles = [overlay_mask(image, mask, palette, ignore_index, alpha) for image, mask in samples]
    grid = image_grid(tiles, columns)
    shown = sorted({int(v) for _, mask in samples for v in np.unique(mask)
                    if 0 <= v < len(palette) and v != ignore_index})
    legend = legend_image(names, palette, grid.width, ids=shown)
    sheet = Image.new("RGB", (grid.width, grid.height + legend.height), (255, 255, 255))
    sheet.paste(grid, (0, 0))
    sheet.paste(legend, (0, grid.height))
    return save_image(sheet, Path(path))


# ------------------------------------------------------------------ evaluation and prediction pictures
ERROR_COLOR = np.array([255, 30, 30], dtype=np.float32)
NEUTRAL_COLOR = np.array([128, 128, 128], dtype=np.float32)


def to_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (H, W, 3) from a (3, H, W) tensor or an (H, W, 3) array, uint8 or float in [0, 1]."""
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.is_floating_point():
            tensor = (tensor.clamp(0, 1) * 255).round().to(torch.uint8)
        image = tensor.permute(1, 2, 0).numpy() if tensor.ndim == 3 else tensor.numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array


def to_mask(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    return mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)


def overlay(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    palette: np.ndarray,
    alpha: float = 0.5,
    ignore_index: int = 255,
) -> np.ndarray:
    """`overlay_mask` for tensors as well as arrays (CHW tensors, float images)."""
    return overlay_mask(to_hwc(image), to_mask(mask), palette, ignore_index, alpha)


def error_map(
    image: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    ignore_index: int = 255,
) -> np.ndarray:
    """Wrong pixels in red over a dimmed grey image; ignored pixels flat neutral grey."""
    image = to_hwc(image).astype(np.float32)
    pred, target = to_mask(pred), to_mask(target)
    out = np.repeat(image.mean(-1, keepdims=True) * 0.6, 3, axis=-1)
    ignored = target == ignore_index
    wrong = (pred != target) & ~ignored
    out[wrong] = out[wrong] * 0.25 + ERROR_COLOR * 0.75  # a trace of the image stays under the error
    out[ignored] = NEUTRAL_COLOR
    return out.round().astype(np.uint8)


def comparison_grid(
    images: Sequence[np.ndarray | torch.Tensor],
    preds: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,  # a sequence, or a batch tensor (B, H, W)
    targets: Sequence[np.ndarray | torch.Tensor],
    palette: np.ndarray,
    ignore_index: int = 255,
) -> np.ndarray:
    """(H, W, 3) uint8: one row per image, image | prediction overlay | ground-truth overlay | errors."""
    tiles = []
    for image, pred, target in zip(images, preds, targets, strict=True):
        tiles += [to_hwc(image), overlay(image, pred, palette, ignore_index=ignore_index),
                  overlay(image, target, palette, ignore_index=ignore_index),
                  error_map(image, pred, target, ignore_index)]
    return np.asarray(image_grid(tiles, columns=4))


def encode_png(array: np.ndarray) -> bytes:
    """The PNG file's bytes, for a caller that writes them itself (segkit.safe_files)."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(array: np.ndarray, path: Path) -> Path:
    return save_image(Image.fromarray(array), path)


def save_image(image: Image.Image, path: Path) -> Path:
    """`image` in the format its suffix names, written by segkit.safe_files: never through a planted link."""
    image_format = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return safe_files.write_with(path, lambda buffer: image.save(buffer, format=image_format))


def save_figure(fig: Any, path: Path) -> Path:
    """A matplotlib figure in the format its suffix names, written by segkit.safe_files."""
    return safe_files.write_with(path, lambda buffer: fig.savefig(buffer, format=Path(path).suffix[1:] or "png"))


def save_mask_png(mask: np.ndarray | torch.Tensor, path: Path) -> Path:
    """Class ids as a single-channel PNG: 8-bit when every id fits, else 16-bit."""
    mask = to_mask(mask)
    dtype = np.uint8 if mask.max(initial=0) < 256 and mask.min(initial=0) >= 0 else np.uint16
    return save_png(mask.astype(dtype), path)


def plain_text(function: Callable[..., Any]) -> Callable[..., Any]:
    """Draw every string as written: names come from files (class names, run names), and matplotlib would
    otherwise parse `$...$` as mathtext (or hand text to LaTeX), where a stray `$` or `\\` fails the figure."""

    @functools.wraps(function)
    def drawn_as_plain_text(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return function(*args, **kwargs)

    return drawn_as_plain_text


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # Agg canvas by default: no display, no pyplot state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _rgb(palette: np.ndarray, index: int) -> tuple[float, float, float]:
    return tuple(float(v) / 255 for v in palette[index])  # type: ignore[return-value]


@plain_text
def save_comparison(
    image: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    path: Path,
    class_names: Sequence[str],
    palette: np.ndarray,
    ignore_index: int = 255,
    title: str = "",
) -> Path:
    """Prediction overlay | ground-truth overlay | error map, with a legend of the classes shown."""
    from matplotlib.patches import Patch

    pred_np, target_np = to_mask(pred), to_mask(target)
    panels = [
        ("prediction", overlay(image, pred_np, palette, ignore_index=ignore_index)),
        ("ground truth", overlay(image, target_np, palette, ignore_index=ignore_index)),
        ("errors (red; grey = ignored)", error_map(image, pred_np, target_np, ignore_index)),
    ]
    height, width = pred_np.shape
    fig = _figure(3 * 3.2, 3.2 * height / width + 0.9)
    for ax, (name, picture) in zip(fig.subplots(1, 3), panels, strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    shown = np.unique(np.concatenate([pred_np.ravel(), target_np.ravel()]))
    present = [int(c) for c in shown if 0 <= c < min(len(palette), len(class_names))]
    handles = [Patch(facecolor=_rgb(palette, i), edgecolor="black", label=class_names[i]) for i in present]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, max(1, len(handles))), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


UNCERTAINTY_TITLES = {
    "confidence": "confidence (largest probability)",
    "entropy": "entropy / log C",
    "variance": "variance across samples",
}


@plain_text
def save_uncertainty_panels(
    image: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    maps: Mapping[str, np.ndarray | torch.Tensor],
    path: Path,
    palette: np.ndarray,
    ignore_index: int = 255,
) -> Path:
    """Prediction overlay | each uncertainty map (confidence, entropy, variance), all on one 0-1 colour scale.

    The maps are in [0, 1] (segkit/inference/uncertainty.py), so one fixed scale makes images comparable:
    dark = sure for entropy and variance, bright = sure for confidence."""
    pred_np = to_mask(pred)
    prediction = overlay(image, pred_np, palette, ignore_index=ignore_index)
    panels: list[tuple[str, np.ndarray, str | None]] = [("prediction", prediction, None)]
    for name, values in maps.items():
        array = values.float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        panels.append((UNCERTAINTY_TITLES.get(name, name), array, "viridis"))
    height, width = pred_np.shape
    fig = _figure(3.2 * len(panels), 3.2 * height / width + 0.6)
    for ax, (name, picture, cmap) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
        shown = ax.imshow(picture, interpolation="nearest", cmap=cmap, vmin=0 if cmap else None,
                          vmax=1 if cmap else None)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        if cmap:
            fig.colorbar(shown, ax=ax, shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


@plain_text
def save_reliability_diagram(calibration: Mapping[str, Any], path: Path) -> Path:
    """Accuracy against mean confidence per bin (bars), the diagonal of perfect calibration, and
    the share of pixels per bin; `calibration` as ReliabilityBins.compute() gives it."""
    bins = calibration["bins"]
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    width = bins[0]["upper"] - bins[0]["lower"]
    fig = _figure(4.8, 5.2)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.bar(centres, [b["accuracy"] or 0.0 for b in bins], width=width, edgecolor="black", linewidth=0.5,
            color="#4c72b0", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.plot(centres, [b["confidence"] if b["confidence"] is not None else np.nan for b in bins], "o",
             color="#dd8452", markersize=3, label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    temperature = calibration.get("temperature", 1.0)
    top.set_title(f"Reliability: ECE {calibration['ece']:.4f} (temperature {temperature:.3g})", fontsize=10)
    top.legend(fontsize=8, loc="upper left")
    total = max(1, sum(b["count"] for b in bins))
    bottom.bar(centres, [b["count"] / total for b in bins], width=width, color="grey", edgecolor="black",
               linewidth=0.5)
    bottom.set_xlabel("confidence (largest softmax probability)")
    bottom.set_ylabel("pixels")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


@plain_text
def save_iou_bars(
    per_class_iou: Mapping[str, float | None], path: Path, palette: np.ndarray | None = None
) -> Path:
    """Horizontal bars, one per class; a class with no pixels anywhere (no IoU) is marked n/a."""
    names = list(per_class_iou)
    raw = [None if v is None or math.isnan(v) else float(v) for v in per_class_iou.values()]
    values = [0.0 if v is None else v for v in raw]
    palette = stable_palette(len(names)) if palette is None else palette
    fig = _figure(6.4, 0.9 + 0.3 * len(names))
    ax = fig.subplots()
    ax.barh(range(len(names)), values, color=[_rgb(palette, i) for i in range(len(names))], edgecolor="black",
            linewidth=0.5)
    for i, value in enumerate(raw):
        ax.text(values[i] + 0.01, i, "n/a" if value is None else f"{value:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("IoU")
    ax.set_title("IoU per class", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


@plain_text
def save_confusion(
    confusion: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], path: Path
) -> Path:
    """Row-normalised confusion matrix (each row: where that true class went), as a heat map."""
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    size = max(4.0, 0.45 * n + 2.0)
    fig = _figure(size + 1.0, size)
    ax = fig.subplots()
    heat = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(heat, ax=ax, shrink=0.8)
    ax.set_title("confusion matrix (rows normalised)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


def read_epochs_csv(path: Path) -> list[dict[str, float]]:
    """The trainer's epochs.csv as rows of floats; empty cells (no validation that epoch) left out."""
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


@plain_text
def save_training_curves(epochs_csv: Path, path: Path) -> Path | None:
    """Training loss and validation mIoU / mean Dice / pixel accuracy per epoch; None without a CSV."""
    if not epochs_csv.is_file():
        return None
    rows = read_epochs_csv(epochs_csv)
    if not rows:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(9.0, 3.4)
    loss_ax, val_ax = fig.subplots(1, 2)
    for ax, keys, title in (
        (loss_ax, ["train/loss"], "training loss"),
        (val_ax, ["val/miou", "val/mdice", "val/pixel_acc"], "validation"),
    ):
        for key in keys:
            points = [(r["epoch"] + 1, r[key]) for r in rows if key in r and "epoch" in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=key.split("/")[-1])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path
