"""Checkpoints written atomically and read without unpickling arbitrary objects; safetensors + YAML pairs."""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from segkit.errors import CheckpointError
from segkit.runs.run_dir import LAST
from segkit.runs.safe_files import atomic_write, check_checkpoint_archive, is_regular_file, write_bytes

log = logging.getLogger(__name__)
METADATA_PREFIX = "segkit."  # safetensors metadata keys segkit writes (values: JSON)


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


def save_safetensors(model: torch.nn.Module, config_yaml: str, path: Path,
                     extras: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """The weights as `<stem>.safetensors` (no pickle at all) and the config as plain `<stem>.yaml` beside them.

    Each file is written to a temporary name and renamed. A tensor the model reaches under two names
    (`encoder` and `net.encoder`) is stored once, under its first name, as safetensors requires. `extras`
    (plain values: the checkpoint's `calibration` and `geometry`) go into the file's string metadata as JSON
    under `segkit.<key>`: the YAML beside it stays the training config, checked as a checkpoint's is."""
    from safetensors.torch import save

    state = model.state_dict()
    tensors = {name: state[name].contiguous() for name in _first_names(model) if name in state}
    config = config_path(path)
    metadata = {f"{METADATA_PREFIX}{key}": json.dumps(value) for key, value in (extras or {}).items()}
    for target, data in ((path, save(tensors, metadata=metadata or None)), (config, config_yaml.encode())):
        try:
            write_bytes(target, data)
        except OSError as error:
            raise CheckpointError(f"{target}: cannot write ({error.strerror or error})") from None
    return path, config


def config_path(weights: Path) -> Path:
    """`best.safetensors` -> `best.yaml`: the config that goes with safetensors weights."""
    return weights.with_suffix(".yaml")


def read_safetensors_config(path: Path) -> str:
    """The YAML config beside safetensors weights (as written by save_safetensors)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    config = config_path(path)
    try:
        return config.read_text()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read its config {config.name} ({error.strerror or error}); "
                              "segkit-export format=safetensors writes both files") from None


def read_safetensors_extras(path: Path) -> dict[str, Any]:
    """The `extras` save_safetensors stored (`calibration`, `geometry`); {} for a file without them."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    extras = {}
    for key, value in metadata.items():
        if key.startswith(METADATA_PREFIX):
            try:
                extras[key.removeprefix(METADATA_PREFIX)] = json.loads(value)
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: metadata {key} is not valid JSON") from None
    return extras


def load_safetensors(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`: every tensor it has (second names included), nothing else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, SafetensorError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: weights do not fit the stored model ({reason})") from None
    first = _first_names(model)
    missing = [name for name in missing if name in first]  # second names are filled through the first
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the stored model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")


def _first_names(model: torch.nn.Module) -> set[str]:
    """Each parameter and buffer under the first name that reaches it."""
    return {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}


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
