"""Checkpoint files: written atomically, read without unpickling arbitrary objects, and read for use into one record.

A trained model comes in one of two files:

    <name>.pt            the trainer's checkpoint: the weights (`model`), the resolved training config, the
                         training geometry, segkit-calibrate's `calibration`, a private run's `privacy` ledger,
                         and what resuming needs (optimizer, progress, RNG states)
    <name>.safetensors   segkit-export format=safetensors: the weights without any pickle, the config as plain
                         `<name>.yaml` beside them, the rest as JSON in the file's metadata (`segkit.<key>`)

`read_checkpoint` reads either once into a `CheckpointRecord`; `segkit.load`, the commands and the exports
build from that record. The trainer resumes from the whole `.pt` (`load_checkpoint`, `load_latest_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from segkit.data.geometry import TrainingGeometry
from segkit.errors import CheckpointError
from segkit.runs.run_dir import LAST, RunDir
from segkit.runs.trusted import checked_checkpoint_config
from segkit.safe_files import (
    atomic_write,
    check_checkpoint_archive,
    check_config_text,
    check_json_text,
    is_regular_file,
    write_bytes,
)

log = logging.getLogger(__name__)
PT, SAFETENSORS = "pt", "safetensors"  # the two formats a CheckpointRecord is read from
METADATA_PREFIX = "segkit."  # safetensors metadata keys segkit writes (values: JSON)


@dataclass(frozen=True)
class CheckpointRecord:
    """A trained model as its file holds it, read once: what every loader builds from.

    The tensors and the rest of the file take no part in comparisons: two records are equal when they
    read the same file to the same config, geometry, temperature, class names and privacy ledger."""

    path: Path
    format: str  # PT | SAFETENSORS
    config: DictConfig  # the training config: checked (runs/trusted.py) unless trusted; pretrained weights off
    geometry: TrainingGeometry  # how training saw images, what inference reproduces (data/geometry.py)
    temperature: float  # logits are divided by it (segkit-calibrate); 1.0 when never calibrated
    class_names: tuple[str, ...]
    privacy: Mapping[str, Any] | None  # a privacy=dp run's accountant ledger (engine/privacy.py); None otherwise
    weights: Mapping[str, torch.Tensor] = field(repr=False, compare=False)
    stored: Mapping[str, Any] = field(repr=False, compare=False)  # a .pt's every entry, to rewrite it; {} otherwise

    @property
    def private(self) -> bool:
        """Trained with privacy=dp: BatchNorm was replaced by GroupNorm, so a model built for it must be too."""
        return self.config.get("privacy") is not None

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the weights into `model` (built from `config`): every tensor it has, nothing else.

        A tensor the model reaches under two names (`encoder` and `net.encoder`) is filled through its
        first name, the only one a safetensors file stores."""
        try:
            missing, unexpected = model.load_state_dict(self.weights, strict=False)
        except RuntimeError as error:  # a shape that does not fit
            reason = str(error).splitlines()[0]
            raise CheckpointError(f"{self.path}: weights do not fit the stored model ({reason})") from None
        first = _first_names(model)
        missing = [name for name in missing if name in first]
        if missing or unexpected:
            raise CheckpointError(f"{self.path}: weights do not fit the stored model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")


def read_checkpoint(path: str | Path, *, trust: bool = False) -> CheckpointRecord:
    """A `.pt` checkpoint, or a `.safetensors` export with the `.yaml` beside it, as one record.

    Only tensors and plain values are read, and unless `trust` the stored config may only build segkit's
    own model and data set code (segkit/runs/trusted.py): anything else is refused here, before anything
    is built. `trust=True` skips that check for a file whose author you trust."""
    path = Path(path).expanduser()
    if path.suffix == f".{SAFETENSORS}":
        text = _read_safetensors_config(path)
        weights, stored = _read_safetensors(path)
        file_format, entries = SAFETENSORS, {}
    else:
        stored = load_checkpoint(path)
        stored_text = stored.get("config")
        if not isinstance(stored_text, str):
            raise CheckpointError(f"{path}: no stored config; the checkpoint was not written by segkit's trainer")
        text = stored_text
        weights, file_format, entries = stored["model"], PT, stored
    config = _training_config(text, path, trust)
    recorded = stored.get("geometry")  # older checkpoints have none: their config says it
    try:
        geometry = (TrainingGeometry.from_dict(recorded) if isinstance(recorded, Mapping)
                    else TrainingGeometry.from_config(config))
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise CheckpointError(f"{path}: stored training geometry is not valid ({error})") from None
    privacy = stored.get("privacy")
    return CheckpointRecord(path, file_format, config, geometry, _temperature(stored, path),
                            _class_names(config, stored, path), privacy if isinstance(privacy, Mapping) else None,
                            weights, entries)


def _training_config(text: str, path: Path, trust: bool) -> DictConfig:
    """The stored config with pretrained weights switched off (the file holds every weight: never download)."""
    check_config_text(text, path)  # no alias bomb, tag or deep nesting reaches the parser, trusted or not
    try:
        cfg = OmegaConf.create(text)
    except Exception as error:  # noqa: BLE001 - any YAML problem gets the same one-line report
        reason = str(error).splitlines()[0]
        raise CheckpointError(f"{path}: stored config is not valid YAML ({reason})") from None
    if isinstance(cfg, DictConfig) and not trust:
        cfg = checked_checkpoint_config(cfg, str(path))
    if not isinstance(cfg, DictConfig) or cfg.get("model") is None or cfg.get("dataset") is None:
        raise CheckpointError(f"{path}: stored config has no model/dataset section")
    backbone = cfg.model.get("backbone")
    if isinstance(backbone, DictConfig):
        backbone.pretrained = False
        backbone.weights = None
    return cfg


def _temperature(stored: Mapping[str, Any], path: Path) -> float:
    calibration = stored.get("calibration") or {}
    temperature = calibration.get("temperature", 1.0) if isinstance(calibration, Mapping) else None
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise CheckpointError(f"{path}: calibration.temperature must be a positive number, got {temperature!r}")
    return float(temperature)


def _class_names(config: DictConfig, stored: Mapping[str, Any], path: Path) -> tuple[str, ...]:
    """The config's `dataset.class_names`; else the names the data set itself supplied (e.g. a dataset.json),
    as an export or the run's metrics.json recorded them; else class_0, class_1, ..."""
    count = int(config.dataset.num_classes)
    names = config.dataset.get("class_names")
    if names:
        return tuple(names)
    names = stored.get("class_names")
    if not (isinstance(names, list) and len(names) == count):
        names = (RunDir.of_checkpoint(path).read_metrics() or {}).get("class_names")
    if isinstance(names, list) and len(names) == count:
        return tuple(names)
    return tuple(f"class_{i}" for i in range(count))


def save_calibration(record: CheckpointRecord, calibration: Mapping[str, Any]) -> None:
    """Rewrite the record's `.pt` with segkit-calibrate's `calibration` entry and every other entry as read."""
    if record.format != PT:
        raise CheckpointError(f"{record.path}: only a .pt checkpoint stores a calibration; calibrate the .pt, "
                              "then export it again")
    save_checkpoint({**record.stored, "calibration": dict(calibration)}, record.path)


def previous_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: bool = False) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A crash or a full disk at any moment leaves the previous file at `path` intact. With
    `keep_previous`, the file being replaced stays as `<name>.prev.pt`, a fallback should
    `path` ever be damaged later.
    """
    try:
        with atomic_write(path, "wb", root=path.parent.parent) as handle:
            torch.save(state, handle)
            if keep_previous and is_regular_file(path):
                os.replace(path, previous_path(path))
    except OSError as error:
        raise CheckpointError(f"{path}: cannot write checkpoint ({error.strerror or error}); "
                              "the previous checkpoint is unchanged") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary objects."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    check_checkpoint_archive(path)  # no compressed or oversized records: nothing inflates past the file's size
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused, it holds objects other than tensors and plain values ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a segkit checkpoint (no 'model' entry)")
    return state


def load_latest_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """last.pt, or last.prev.pt with a warning when last.pt is missing or damaged; None if neither."""
    last = directory / LAST
    for path in (last, previous_path(last)):
        if not path.is_file():
            continue
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            log.warning("%s; trying the previous checkpoint", error)
    return None


def save_safetensors(model: torch.nn.Module, record: CheckpointRecord, path: Path) -> tuple[Path, Path]:
    """`model` (built from `record`) as `<stem>.safetensors` (no pickle at all), its config as plain `<stem>.yaml`.

    The temperature, geometry, class names and privacy ledger go into the file's string metadata as JSON
    under `segkit.<key>`, so read_checkpoint reads both files back into a record equal to `record` in all
    of them; the YAML stays the training config, checked as a checkpoint's is. Each file is written to a
    temporary name and renamed. A tensor the model reaches under two names is stored once, under its first
    name, as safetensors requires."""
    from safetensors.torch import save

    state = model.state_dict()
    tensors = {name: state[name].contiguous() for name in _first_names(model) if name in state}
    extras: dict[str, Any] = {"calibration": {"temperature": record.temperature},
                              "geometry": record.geometry.as_dict(), "class_names": list(record.class_names)}
    if record.privacy is not None:
        extras["privacy"] = dict(record.privacy)
    metadata = {f"{METADATA_PREFIX}{key}": json.dumps(value) for key, value in extras.items()}
    config = _config_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, data in ((path, save(tensors, metadata=metadata)),
                         (config, OmegaConf.to_yaml(record.config).encode())):
        try:
            write_bytes(target, data)  # a new file renamed over the target, never through a planted link
        except OSError as error:
            raise CheckpointError(f"{target}: cannot write ({error.strerror or error})") from None
    return path, config


def _config_path(weights: Path) -> Path:
    """`best.safetensors` -> `best.yaml`: the config that goes with safetensors weights."""
    return weights.with_suffix(".yaml")


def _read_safetensors_config(path: Path) -> str:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    config = _config_path(path)
    try:
        return config.read_text()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read its config {config.name} ({error.strerror or error}); "
                              "segkit-export format=safetensors writes both files") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the plain values save_safetensors stored in the metadata ({} for a file without them)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    values = {}
    for key, value in metadata.items():
        if key.startswith(METADATA_PREFIX):
            check_json_text(value, f"{path}: metadata {key}")
            try:
                values[key.removeprefix(METADATA_PREFIX)] = json.loads(value)
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: metadata {key} is not valid JSON") from None
    return tensors, values


def _first_names(model: torch.nn.Module) -> set[str]:
    """Each parameter and buffer under the first name that reaches it."""
    return {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
