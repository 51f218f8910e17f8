"""`segkit-calibrate checkpoint=<run>/checkpoints/best.pt`: temperature scaling fitted on a held-out
split and stored in the checkpoint (`calibration`: temperature, split, pixels, ECE before/after).

One pass over the split with the geometry segkit-evaluate uses keeps a random sample of valid pixels'
logits; the temperature minimising their cross-entropy is fitted, and the ECE of that sample before and
after is reported. The checkpoint is rewritten atomically with only the `calibration` entry added.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from segkit.cli.common import hydra_main, run_or_exit
from segkit.errors import ConfigError

log = logging.getLogger("segkit")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit, store and return the calibration record (the checkpoint's run directory is locked meanwhile)."""
    from segkit.engine.run_lock import guard_run_dir

    checkpoint = Path(cfg.checkpoint).expanduser()
    with guard_run_dir(checkpoint.parent, "calibration"):
        return calibrate(checkpoint, cfg)


def calibrate(checkpoint: Path, cfg: DictConfig) -> dict[str, Any]:
    import torch

    from segkit.cli.evaluate import dataset_config
    from segkit.data.loading import build_dataset, build_loader
    from segkit.engine.progress import Progress
    from segkit.inference.calibration import PixelSample, ece_of, fit_temperature
    from segkit.inference.predictor import from_record
    from segkit.models.sliding import MODES
    from segkit.runs.checkpoint import PT, read_checkpoint, save_calibration

    if cfg.mode not in MODES:
        raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.max_pixels <= 0:
        raise ConfigError("max_pixels", f"must be > 0, got {cfg.max_pixels}")
    record = read_checkpoint(checkpoint)
    if record.format != PT:  # before the pass over the split: only a .pt can store what it fits
        raise ConfigError("checkpoint", f"{checkpoint}: calibrate the .pt checkpoint, then export it again")
    predictor = from_record(record, cfg.device)
    predictor.model.temperature = 1.0  # refit from the raw logits, whatever was stored before
    dataset = build_dataset(dataset_config(predictor.cfg.dataset, cfg.get("dataset")), cfg.split)
    stored_trainer = predictor.cfg.get("trainer") or {}
    batch_size = cfg.batch_size or stored_trainer.get("val_batch_size") or stored_trainer.get("batch_size", 8)
    loader = build_loader(dataset, batch_size=int(batch_size), num_workers=cfg.num_workers, train=False, seed=0,
                          pin_memory=predictor.device.type == "cuda")
    height, width = dataset.image_size
    sample = PixelSample.create(int(cfg.max_pixels), len(dataset) * height * width, seed=int(cfg.seed))
    progress = Progress(len(loader), "calibrate", enabled=cfg.progress_bar)
    with torch.no_grad():
        for images, masks in loader:
            sample.add(predictor.logits(images, cfg.mode, False, cfg.crop_size, cfg.stride), masks,
                       dataset.ignore_index)
            progress.advance(1)
    progress.close()
    logits, target = sample.tensors()
    if target.numel() == 0:
        raise ConfigError("split", f"{cfg.split!r} has no labelled pixels to calibrate on")
    temperature = fit_temperature(logits, target)
    calibration = {
        "temperature": temperature, "split": str(cfg.split), "pixels": int(target.numel()),
        "n_bins": int(cfg.n_bins), "ece_before": ece_of(logits, target, 1.0, cfg.n_bins),
        "ece_after": ece_of(logits, target, temperature, cfg.n_bins),
    }
    save_calibration(record, calibration)
    log.info("%s: temperature %.4f on %d %s pixels; ECE %.4f -> %.4f", checkpoint, temperature,
             calibration["pixels"], cfg.split, calibration["ece_before"], calibration["ece_after"])
    return calibration


@hydra_main("calibrate")
def main(cfg: DictConfig) -> None:
    run_or_exit(lambda: run(cfg))


if __name__ == "__main__":
    main()
