"""`segkit-evaluate checkpoint=<run>/checkpoints/best.pt`: metrics, masks, pictures, report.

Writes into the output directory:
  metrics.json        mIoU, mean Dice, pixel accuracy, IoU / Dice / precision / recall per class, confusion
                      matrix, and the `metrics:` the training config chose (stage test), and
                      `scored_at` (native: each image at its own size against its untouched mask)
  per_image.jsonl     one JSON object per image (filename, mask path, pixel accuracy, IoU, mIoU)
  per_image/          predicted masks, single-channel PNG class ids at the original image size; with
                      uncertainty_maps=true also <stem>_confidence/_entropy(/_variance).png, 8-bit
  report/             report.html: summary, per-class table, a side panel of classes (choose one: the images
                      where its IoU is lowest), charts and every image's numbers, sortable; figures for the
                      worst_n images by mIoU and the worst_per_class of each class (images/); report.js and
                      data.js beside it. Opens from file://, no network.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig, OmegaConf

from segkit import safe_files
from segkit.cli.common import hydra_main, run_or_exit
from segkit.errors import ConfigError
from segkit.runs.json import dumps, json_safe
from segkit.runs.run_dir import RunDir

if TYPE_CHECKING:  # the library (torch) is imported where it is used, so --help answers at once
    import numpy as np
    import torch

    from segkit.inference.evaluation import EvalResult, ImageResult
    from segkit.inference.predictor import Predictor
    from segkit.reporting.browsing import ImageRow

log = logging.getLogger("segkit")


def dataset_config(stored: DictConfig, overrides: DictConfig | None) -> DictConfig:
    """The checkpoint's dataset node with every non-null override applied."""
    merged = OmegaConf.create(cast(dict[str, Any], OmegaConf.to_container(stored, resolve=True)))
    changes = cast(dict[str, Any], OmegaConf.to_container(overrides, resolve=True)) if overrides else {}
    for key, value in changes.items():
        if value is not None:
            merged[key] = value
    return merged


def default_output_dir(cfg: DictConfig, checkpoint: Path) -> Path:
    name = f"{checkpoint.stem}_{cfg.split}"
    if cfg.mode != "auto":
        name += f"_{cfg.mode}"
    if cfg.test_size:
        name += f"_{cfg.test_size[0]}x{cfg.test_size[1]}"
    if cfg.tta:
        name += "_tta"
    if cfg.uncertainty_method == "mc_dropout":  # its masks are the mean of stochastic passes: other metrics
        name += "_mc_dropout"
    if cfg.score_at != "native":
        name += f"_at_{cfg.score_at}"
    return RunDir.of_checkpoint(checkpoint).eval_dir(name)


def postprocessor(cfg: DictConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if not (cfg.min_region or cfg.max_hole):
        return None
    from segkit.models.sliding import clean_mask

    min_region, max_hole = int(cfg.min_region), int(cfg.max_hole)

    def clean(pred: torch.Tensor) -> torch.Tensor:
        return clean_mask(pred, min_region=min_region, max_hole=max_hole)

    return clean


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as configured; returns what metrics.json holds."""
    checkpoint = Path(cfg.checkpoint).expanduser()
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg, checkpoint)
    from segkit.engine.run_lock import guard_run_dir

    with guard_run_dir(out_dir, "evaluation"):  # no other live process writes into the same run directory
        return evaluate_into(out_dir, checkpoint, cfg)


def evaluate_into(out_dir: Path, checkpoint: Path, cfg: DictConfig) -> dict[str, Any]:
    from segkit.data.loading import build_dataset, build_loader
    from segkit.inference.evaluation import evaluate
    from segkit.inference.predictor import load, tta_option, tta_settings
    from segkit.inference.uncertainty import check_method, check_model
    from segkit.metrics import build_metrics
    from segkit.models.sliding import MODES
    from segkit.reporting.plots import stable_palette

    if cfg.mode not in MODES:
        raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    check_method(cfg.uncertainty_method, *tta_settings(tta_option(cfg)), int(cfg.mc_samples))
    predictor = load(checkpoint, cfg.device, trust=bool(cfg.trust_checkpoint))
    check_model(predictor.model, cfg.uncertainty_method)  # mc_dropout without dropout: one line, before any work
    dataset_cfg = dataset_config(predictor.cfg.dataset, cfg.get("dataset"))
    # The loader letterboxes into the training box, like validation; test_size chooses another test scale.
    dataset_cfg.image_size = list(cfg.test_size) if cfg.test_size else list(predictor.geometry.image_size)
    dataset = build_dataset(dataset_cfg, cfg.split)
    stored_trainer = predictor.cfg.get("trainer") or {}
    batch_size = cfg.batch_size or stored_trainer.get("val_batch_size") or stored_trainer.get("batch_size", 8)
    loader = build_loader(dataset, batch_size=int(batch_size), num_workers=cfg.num_workers, train=False,
                          seed=0, pin_memory=predictor.device.type == "cuda")
    safe_files.make_dirs(out_dir, root=out_dir if cfg.output_dir else RunDir.of_checkpoint(checkpoint).path)
    safe_files.refuse_links(out_dir)  # the charts, masks and report below are written by libraries
    mode = predictor.geometry.mode if cfg.mode == "auto" else cfg.mode
    log.info("evaluating %s on %s/%s (%d images, letterboxed to %dx%d, mode=%s%s, scored at the %s size) -> %s",
             checkpoint, dataset.name, cfg.split, len(dataset), *dataset.image_size, mode,
             ", tta" if cfg.tta else "", cfg.score_at, out_dir)

    save_masks = MaskWriter(dataset, out_dir / "per_image", cfg.score_at) if cfg.save_masks else None
    result = evaluate(
        predictor, dataset, loader, mode=mode, tta=tta_option(cfg), crop_size=cfg.crop_size, stride=cfg.stride,
        score_at=cfg.score_at, worst_n=cfg.worst_n if cfg.report else 0,
        worst_per_class=cfg.worst_per_class if cfg.report else 0, on_image=save_masks,
        postprocess=postprocessor(cfg), progress_bar=cfg.progress_bar,
        extra_metrics=build_metrics(predictor.cfg.get("metrics"), "test", predictor.device),
        calibration_bins=int(cfg.calibration_bins), uncertainty=bool(cfg.uncertainty_maps),
        uncertainty_method=str(cfg.uncertainty_method), mc_samples=int(cfg.mc_samples),
    )
    meta = {
        "checkpoint": str(checkpoint), "dataset": dataset.name, "split": cfg.split, "images": len(dataset),
        "scored_at": cfg.score_at, "test_size": list(dataset.image_size), "mode": mode,
        "geometry": predictor.geometry.as_dict(), "tta": json_safe(tta_option(cfg)),
        "device": str(predictor.device), "postprocess": {"min_region": cfg.min_region, "max_hole": cfg.max_hole},
        "uncertainty_method": str(cfg.uncertainty_method),
        **({"mc_samples": int(cfg.mc_samples)} if cfg.uncertainty_method == "mc_dropout" else {}),
    }
    metrics = {**meta, **result.summary}
    safe_files.write_text(out_dir / "metrics.json", dumps(metrics, indent=2))
    with safe_files.atomic_write(out_dir / "per_image.jsonl", "w") as handle:
        for record in result.records:
            handle.write(dumps(record) + "\n")
    if cfg.report:
        palette = stable_palette(dataset.num_classes, dataset.colors or predictor.colors)
        report = write_evaluation_report(out_dir / "report", result, predictor, checkpoint, meta, palette)
        log.info("report: %s", report)
    print_summary(result.summary, dataset.class_names, cfg.score_at)
    return json_safe(metrics)


class MaskWriter:
    """Saves each prediction as a PNG aligned with its original image.

    Scored at the native size the prediction already is; scored at the input size, the letterbox
    is undone on the labels (nearest).
    """

    def __init__(self, dataset, directory: Path, score_at: str) -> None:
        self.dataset = dataset
        self.directory = directory
        self.score_at = score_at
        directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, item: ImageResult) -> None:
        from PIL import Image

        from segkit.inference.evaluation import image_path
        from segkit.inference.uncertainty import to_grey
        from segkit.reporting.plots import save_mask_png, save_png

        path = image_path(self.dataset, item.index)
        size = None
        if path is not None and self.score_at == "input":  # native predictions are at the original size already
            with Image.open(path) as img:
                width, height = img.size
            size = (height, width)
        save_mask_png(self._original_size(item.pred, size), self.directory / f"{item.stem}_pred.png")
        # Uncertainty maps (uncertainty_maps=true): 8-bit greyscale, 255 = confidence 1 / entropy 1 / the
        # largest possible variance (segkit/inference/uncertainty.py).
        for name, values in item.uncertainty_maps().items():
            save_png(to_grey(self._original_size(values, size)).numpy(), self.directory / f"{item.stem}_{name}.png")

    def _original_size(self, values: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        from segkit.data.geometry import unletterbox

        return values if size is None else unletterbox(values, size, self.dataset.image_size)


def write_evaluation_report(
    report_dir: Path, result: EvalResult, predictor: Predictor, checkpoint: Path, meta: dict[str, Any],
    palette: np.ndarray,
) -> Path:
    from segkit.reporting.html import write_report

    names = list(result.summary["per_class_iou"])
    images = report_dir / "images"
    figures = save_figures(result.shown(), images, names, palette, predictor.ignore_index)
    worst_per_class = {name: [item.index for item in items] for name, items in result.worst_per_class.items()}
    return write_report(report_dir, summary=result.summary, class_names=names, palette=palette, meta=meta,
                        charts=save_charts(result.summary, names, images, palette, checkpoint),
                        images=image_rows(result.records, names, figures), worst_per_class=worst_per_class)


def image_rows(
    records: list[dict[str, Any]], names: list[str], figures: dict[int, tuple[Path, Path | None]]
) -> list[ImageRow]:
    """Every image as the report lists it, with its figures where drawn."""
    from segkit.reporting.browsing import ImageRow

    rows = []
    for index, record in enumerate(records):  # in evaluation order: a record's position is its image's index
        figure, uncertainty = figures.get(index, (None, None))
        rows.append(ImageRow(record["filename"], record["miou"], record["pixel_accuracy"],
                             [record["per_class_iou"][name] for name in names], figure, uncertainty))
    return rows


def save_charts(
    summary: dict[str, Any], names: list[str], images: Path, palette: np.ndarray, checkpoint: Path
) -> dict[str, Path | None]:
    from segkit.reporting.plots import save_confusion, save_iou_bars, save_reliability_diagram, save_training_curves

    return {
        "IoU per class": save_iou_bars(summary["per_class_iou"], images / "iou_per_class.png", palette),
        "Confusion matrix": save_confusion(summary["confusion_matrix"], names, images / "confusion.png"),
        "Reliability diagram": save_reliability_diagram(summary["calibration"], images / "reliability.png")
        if "calibration" in summary else None,
        "Training curves": save_training_curves(RunDir.of_checkpoint(checkpoint).epochs_csv,
                                                images / "training_curves.png"),
    }


def save_figures(
    shown: Sequence[ImageResult], images: Path, names: list[str], palette: np.ndarray, ignore_index: int
) -> dict[int, tuple[Path, Path | None]]:
    """Evaluation index -> the image's comparison figure and, with uncertainty maps, its uncertainty panels."""
    from segkit.reporting.plots import save_comparison, save_uncertainty_panels

    figures: dict[int, tuple[Path, Path | None]] = {}
    for item in shown:
        assert item.image is not None  # evaluate() reads the shown images' pictures
        stem = figure_stem(item.index, item.stem)
        figure = save_comparison(item.image, item.pred, item.target, images / f"{stem}.png", names, palette,
                                 ignore_index=ignore_index, title=f"{item.filename}  mIoU {item.miou:.3f}")
        maps = item.uncertainty_maps()  # uncertainty_maps=true: the maps beside the prediction overlay
        panels = save_uncertainty_panels(item.image, item.pred, maps, images / f"{stem}_uncertainty.png", palette,
                                         ignore_index=ignore_index) if maps else None
        figures[item.index] = (figure, panels)
    return figures


def figure_stem(index: int, stem: str) -> str:
    """figure_00042_<stem>: unique by the evaluation index; the image's own stem, for a person browsing the
    folder, kept to letters, digits, `.`, `-` and `_` (a file name may hold anything else, `<` and `#` included)."""
    return f"figure_{index:05d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:80]}"


def print_summary(summary: dict[str, Any], class_names: list[str], scored_at: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="per class", show_edge=False)
    columns = {"IoU": "per_class_iou", "Dice": "per_class_dice", "precision": "per_class_precision",
               "recall": "per_class_recall"}
    for column in ("class", *columns):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name in class_names:
        values = [summary[key][name] for key in columns.values()]
        table.add_row(name, *("n/a" if v != v else f"{v:.4f}" for v in values))
    console = Console()
    console.print(table)
    console.print(f"mIoU {summary['miou']:.4f}   mean Dice {summary['mdice']:.4f}   "
                  f"pixel accuracy {summary['pixel_acc']:.4f}   (scored at the {scored_at} size)")
    for name, value in (summary.get("metrics") or {}).items():
        console.print(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}")


@hydra_main("evaluate")
def main(cfg: DictConfig) -> None:
    run_or_exit(lambda: run(cfg))


if __name__ == "__main__":
    main()
