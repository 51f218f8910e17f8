"""Throughput side by side, in one process: ceiling, segkit, reference pipeline; evaluation; data only.

Every variant is a step function over its own endless batch source. The timed windows of the
variants of one table are interleaved (A B C A B C ...) so load drift on a shared machine hits
all of them alike; each window first runs `settle` untimed steps (draining the batches a loader
queued while the other variants ran), and the device is synchronised at window edges only.
Figures are medians over windows; ratios are medians of the per-round ratios.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from segkit import safe_files
from segkit.config import validate_config
from segkit.data.loading import build_loader
from segkit.engine.build import TrainingParts, build_parts
from segkit.engine.step import autocast, resolve_device, to_model_input
from segkit.engine.threads import usable_cores
from segkit.models.sliding import forward_logits
from segkit.reference_pipeline import reference_loader
from segkit.reporting.plots import read_epochs_csv

SECTIONS = ("train", "eval", "data")  # what `all` runs
EXTRA_SECTIONS = ("precision",)  # on request only
Step = Callable[[], int]  # runs one step, returns the number of images it processed


@dataclass
class Timing:
    settings: str
    rows: dict[str, list[float]]  # variant -> images/s of each window
    peak_memory: dict[str, float] = field(default_factory=dict)  # variant -> GiB (CUDA only)

    def median(self, name: str) -> float:
        return statistics.median(self.rows[name])

    def ratio(self, numerator: str, denominator: str) -> float:
        return statistics.median(a / b for a, b in zip(self.rows[numerator], self.rows[denominator], strict=True))


def endless(batches: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch after epoch of a loader (setting the EpochSampler's epoch where it has one)."""
    epoch = 0
    while True:
        if hasattr(batches.sampler, "set_epoch"):
            batches.sampler.set_epoch(epoch)
        yield from batches
        epoch += 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(variants: dict[str, Step], device: torch.device, *, windows: int, steps: int, settle: int,
               warmup: int) -> Timing:
    for step in variants.values():
        for _ in range(warmup):
            step()
    rows: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, float] = {}
    for _ in range(windows):
        for name, step in variants.items():
            for _ in range(settle):
                step()
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start, images = time.perf_counter(), 0
            for _ in range(steps):
                images += step()
            synchronize(device)
            rows[name].append(images / (time.perf_counter() - start))
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    settings = f"{windows} windows × {steps} steps (+{settle} untimed) after {warmup} warm-up steps, interleaved"
    return Timing(settings, rows, peaks)


# ---------------------------------------------------------------------------- the variants
def segkit_train_step(parts: TrainingParts) -> Step:
    """The trainer's own step (segkit.engine.step.TrainStep) on its own batches (device cache or prefetched
    DataLoader)."""
    source = endless(parts.train_loader)
    loss_sum = torch.zeros((), device=parts.device)

    def step() -> int:
        images, masks = next(source)
        loss = parts.step.backward(images, masks)
        loss_sum.add_(torch.where(torch.isfinite(loss), loss, 0.0))  # the loop's device-side bookkeeping
        parts.step.optimizer_step()
        return images.shape[0]

    return step


def ceiling_step(parts: TrainingParts, batch: int, crop: tuple[int, int]) -> Step:
    """The same model, optimizer step and precision on one batch already on the device: no data, no augmentation."""
    train = parts.step
    images = to_model_input(torch.rand(batch, 3, *crop, device=parts.device), channels_last=train.channels_last)
    masks = torch.randint(0, parts.train_set.num_classes, (batch, *crop), device=parts.device)

    def step() -> int:
        with train.autocast():
            logits = train.forward(images)
        train.scaler.scale(train.loss_fn(logits.float(), masks)).backward()
        train.optimizer_step()
        return batch

    return step


# trainer.precision x trainer.channels_last, the settings the precision table compares
PRECISION_VARIANTS = {"fp32": ("32", False), "fp32 channels_last": ("32", True),
                      "bf16": ("bf16-mixed", False), "bf16 channels_last": ("bf16-mixed", True)}


def precision_step(parts: TrainingParts, batch: int, crop: tuple[int, int], precision: str,
                   channels_last: bool) -> Step:
    """The ceiling step (one synthetic batch, no data, no augmentation) at another precision and memory
    layout, on its own copy of the model and optimizer: what the arithmetic alone
    gains, whatever the trainer was configured with."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # copied together, the optimizer's parameters are the copied model's
    model, optimizer = copy.deepcopy((parts.model, parts.step.optimizer))
    model.to(memory_format=layout).train()
    images = to_model_input(torch.rand(batch, 3, *crop, device=parts.device), channels_last=channels_last)
    masks = torch.randint(0, parts.train_set.num_classes, (batch, *crop), device=parts.device)

    def step() -> int:
        with autocast(parts.device, precision):
            logits = model(images)
        parts.step.loss_fn(logits.float(), masks).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch

    return step


def plain_step(parts: TrainingParts, loader: Iterable, augment_on_device: bool) -> Step:
    """A handwritten minimal loop over a DataLoader: same model, loss, optimizer and precision.

    `augment_on_device`: the bare loop (uint8 batches, the same Kornia augmentation as segkit);
    otherwise the reference loop (float batches already augmented on the CPU by the workers).
    """
    source = endless(loader)
    train = parts.step
    scaler = train.scaler if train.precision == "16-mixed" else None  # only fp16 needs loss scaling

    def step() -> int:
        images, masks = next(source)
        images, masks = to_model_input(images, parts.device), masks.to(parts.device, non_blocking=True)
        if augment_on_device:
            images, masks = train.augment(images, masks)
        images = to_model_input(images, channels_last=train.channels_last)
        with train.autocast():
            logits = train.forward(images)
        loss = train.loss_fn(logits.float(), masks)
        if scaler is None:
            loss.backward()
            train.optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(train.optimizer)
            scaler.update()
        train.optimizer.zero_grad(set_to_none=True)
        return images.shape[0]

    return step


def eval_step(parts: TrainingParts, batches: Iterable, mode: str, crop: tuple[int, int]) -> Step:
    source = endless(batches)
    train = parts.step

    @torch.no_grad()
    def step() -> int:
        images, masks = next(source)
        images = to_model_input(images, parts.device, train.channels_last)
        with train.autocast():
            logits = forward_logits(train.forward, images, mode=mode, crop_size=crop)
        parts.metrics.update(logits, masks.to(parts.device, non_blocking=True))
        return images.shape[0]

    return step


def data_step(batches: Iterable, augment: Callable | None = None) -> Step:
    source = endless(batches)

    def step() -> int:
        images, masks = next(source)
        if augment is not None:
            augment(to_model_input(images), masks)
        return images.shape[0]

    return step


# ---------------------------------------------------------------------------- the run
@dataclass
class Report:
    device: torch.device
    command: str
    setup: str  # model, data and loop settings as build_parts resolved them
    tables: dict[str, tuple[Timing, dict[str, str]]] = field(default_factory=dict)  # section -> timing, labels
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)


def run(cfg: DictConfig, sections: Iterable[str], command: str, *, windows: int = 5, steps: int = 10,
        warmup: int = 3) -> Report:
    """Build the training parts of `cfg` and time the requested sections (`train`, `eval`, `data`)."""
    validate_config(cfg)
    cfg = cfg.copy()
    OmegaConf.update(cfg, "trainer.max_steps", 10**9)  # the LR schedule never runs out while timing
    tcfg = cfg.trainer
    parts = build_parts(cfg, resolve_device(tcfg.accelerator, "trainer.accelerator"))
    setup = (f"{cfg.model.arch} / {cfg.backbone.name}, {cfg.dataset.name} at {list(cfg.dataset.image_size)} "
             f"({len(parts.train_set)} train / {len(parts.val_set)} val), batch {tcfg.batch_size}, "
             f"precision {tcfg.precision}, channels_last {parts.channels_last}, compile {tcfg.compile}, "
             f"activation_checkpointing {tcfg.activation_checkpointing}, {tcfg.num_workers} workers, "
             f"dataset.cache={cfg.dataset.get('cache', False)}")
    report = Report(parts.device, command, setup, load_before=os.getloadavg())
    crop = tuple(cfg.augmentation.get("crop_size") or cfg.dataset.image_size)
    settle = 2 * tcfg.num_workers + 1  # a DataLoader queues prefetch_factor (2) batches per worker
    timing = {"windows": windows, "steps": steps, "settle": settle, "warmup": warmup}
    device = parts.device
    augmentation = cast(dict[str, Any], OmegaConf.to_container(cfg.augmentation, resolve=True))
    ref = reference_loader(parts.train_set, augmentation, batch_size=tcfg.batch_size,
                           num_workers=tcfg.num_workers, pin_memory=device.type == "cuda")
    cached = cfg.dataset.get("cache") == "device"


    def second_source(split: str) -> Any:
        """Batches of `split` for a second variant: the device cache serves any number of iterators, a
        persistent-worker DataLoader only one, so the DataLoader path gets its own (plain, on the host)."""
        if cached:
            return parts.train_loader if split == "train" else parts.val_loader
        train = split == "train"
        return build_loader(parts.train_set if train else parts.val_set, num_workers=tcfg.num_workers,
                            batch_size=tcfg.batch_size if train else tcfg.val_batch_size or tcfg.batch_size,
                            train=train, seed=tcfg.seed, pin_memory=device.type == "cuda")

    source = "device cache" if cached else "DataLoader + prefetch to the device"
    for section in sections:
        if section == "train":
            parts.model.train()
            labels = {
                "ceiling": "ceiling: synthetic batch on the device, no data, no augmentation",
                "segkit": f"segkit: TrainStep.backward + optimizer_step, {source}, Kornia on {device.type}",
                "bare": f"bare loop: handwritten, {'device cache' if cached else 'DataLoader'}, Kornia on "
                        f"{device.type}, no scaler/scheduler",
                "reference": "reference: DataLoader + torchvision v2 CPU augmentation, plain loop",
            }
            steps_of = {"ceiling": ceiling_step(parts, tcfg.batch_size, crop), "segkit": segkit_train_step(parts),
                        "bare": plain_step(parts, second_source("train"), True),
                        "reference": plain_step(parts, ref, False)}
        elif section == "eval":
            parts.model.eval()
            slide = (max(1, crop[0] // 2), max(1, crop[1] // 2))
            labels = {"whole": "validation, whole image",
                      "slide": f"validation, sliding window {slide[0]}×{slide[1]} (1/3 overlap)"}
            steps_of = {"whole": eval_step(parts, parts.val_loader, "whole", crop),
                        "slide": eval_step(parts, second_source("val"), "slide", slide)}
        elif section == "precision":
            parts.model.train()
            labels = {name: f"ceiling step, trainer.precision={precision}, channels_last {layout}"
                      for name, (precision, layout) in PRECISION_VARIANTS.items()}
            steps_of = {name: precision_step(parts, tcfg.batch_size, crop, precision, layout)
                        for name, (precision, layout) in PRECISION_VARIANTS.items()}
        else:
            labels = {
                "input": f"{'device cache gather' if cached else 'decode + letterbox + collate (CPU workers)'}",
                "segkit": f"{source} + Kornia augmentation on {device.type}",
                "reference": "decode + letterbox + torchvision v2 augmentation + collate (CPU workers)",
            }
            steps_of = {"input": data_step(second_source("train")),
                        "segkit": data_step(parts.train_loader, parts.augment), "reference": data_step(ref)}
        report.tables[section] = (interleave(steps_of, device, **timing), labels)
    report.load_after = os.getloadavg()
    return report


# ---------------------------------------------------------------------------- trainings side by side
def side_by_side(overrides: Sequence[str], command: str, workdir: Path, *, trainings: int = 2,
                 rounds: int = 2) -> str:
    """`trainings` trainings of `overrides` started at once, with segkit's thread default and with every core
    each (torch's own default: what a training did before trainer.threads), the variants in alternating
    rounds so load drift hits both; each training's images/s is the last logging window of its epochs.csv.
    Returns the markdown section."""
    cores = usable_cores()
    variants = {"divided": ("trainer.threads=null (default): the cores divided among the live trainings", []),
                "every core": (f"trainer.threads={cores}: every core each (torch's default)",
                               [f"trainer.threads={cores}"])}
    speed: dict[str, list[float]] = {name: [] for name in variants}  # one value per training
    wall: dict[str, list[float]] = {name: [] for name in variants}  # one value per round
    load_before = os.getloadavg()
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    for round_number in range(rounds):
        for name, (_, extra) in variants.items():
            runs = [workdir / f"{name.replace(' ', '_')}-{round_number}-{index}" for index in range(trainings)]
            start = time.perf_counter()
            processes = [subprocess.Popen(
                [sys.executable, "-m", "segkit.cli.train", *overrides, *extra, f"hydra.run.dir={run}", "logger=none",
                 "trainer.progress_bar=false", "trainer.save_checkpoints=false"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for run in runs]
            for process in processes:
                _, stderr = process.communicate()
                if process.returncode:
                    raise RuntimeError(f"a side-by-side training failed: {stderr.strip()[-2000:]}")
            wall[name].append(time.perf_counter() - start)
            speed[name] += [float(read_epochs_csv(run / "epochs.csv")[-1]["train/images_per_s"]) for run in runs]
    load = " → ".join("/".join(f"{x:.2f}" for x in avg) for avg in (load_before, os.getloadavg()))
    lines = [f"### {datetime.now():%Y-%m-%d %H:%M} · cpu, {trainings} trainings side by side", "",
             f"`{command}`", "", f"- {cpu_name()}, {cores} usable cores; segkit {git_commit()}",
             f"- load average (1/5/15 min) before → after: {load}",
             f"- {rounds} rounds, the variants alternating; images/s of each training's last logging window", "",
             "| variant | images/s per training (median, min – max) | all trainings together | wall per round (s) |",
             "| --- | --- | --- | --- |"]
    for name, (label, _) in variants.items():
        values = speed[name]
        lines.append(f"| {label} | {statistics.median(values):.2f} ({min(values):.2f} – {max(values):.2f}) | "
                     f"{trainings * statistics.median(values):.2f} | {statistics.median(wall[name]):.0f} |")
    ratio = statistics.median(speed["divided"]) / statistics.median(speed["every core"])
    return "\n".join([*lines, "", f"divided / every core = **{ratio:.2f}** (images/s per training)"]) + "\n"


# ---------------------------------------------------------------------------- the record
def environment(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()}, {torch.get_num_threads()} threads"
    packages = ", ".join(f"{p} {version(p)}" for p in
                         ("torch", "torchvision", "kornia", "timm", "segmentation-models-pytorch"))
    return f"{device.type}: {name}; {packages}; segkit {git_commit()}"


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "unknown CPU")


def git_commit() -> str:
    """SEGKIT_COMMIT when the caller knows it (scripts/gpu_check.sh --commit), else git's, "-dirty" when the
    working tree differs from it: a figure is only as reproducible as the code it names."""
    if os.environ.get("SEGKIT_COMMIT"):
        return os.environ["SEGKIT_COMMIT"][:12]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def markdown(report: Report) -> str:
    load = " → ".join("/".join(f"{x:.2f}" for x in avg) for avg in (report.load_before, report.load_after))
    lines = [
        f"### {datetime.now():%Y-%m-%d %H:%M} · {report.device.type}",
        "",
        f"`{report.command}`",
        "",
        f"- {environment(report.device)}",
        f"- load average (1/5/15 min) before → after: {load}",
        f"- {report.setup}",
    ]
    for section, (timing, labels) in report.tables.items():
        lines += ["", f"**{section}** ({timing.settings}; images/s)", "",
                  "| variant | median | min – max | peak GPU memory |", "| --- | --- | --- | --- |"]
        for name, label in labels.items():
            values = timing.rows[name]
            peak = f"{timing.peak_memory[name]:.2f} GiB" if name in timing.peak_memory else "n/a (CPU)"
            lines.append(f"| {label} | {timing.median(name):.1f} | {min(values):.1f} – {max(values):.1f} | {peak} |")
        if section == "precision":
            lines += ["", ", ".join(f"{name} / fp32 = **{timing.ratio(name, 'fp32'):.2f}**"
                                    for name in PRECISION_VARIANTS if name != "fp32")]
        if section == "train":
            lines += ["", ", ".join(f"segkit / {other} = **{timing.ratio('segkit', key):.2f}**" for key, other in
                                    (("ceiling", "ceiling"), ("bare", "bare loop"), ("reference", "reference")))]
    return "\n".join(lines) + "\n"


def append(report: Report, path: Path) -> str:
    text = markdown(report)
    with safe_files.open_append(path) as handle:
        handle.write("\n" + text)
    return text
