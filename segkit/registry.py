"""The one table of what a config may build: every loss, model builder, dataset format, schedule,
augmentation and tracker, segkit's own and those of the user's packages.

A part registers where it is written: a decorator (or one `register` call) in its own module, with
what the rest of segkit needs to know about it (a dataset format's schema, the pip extra a tracker
needs). Everything that used to be a hand-kept list derives from here: the trust allowlist
(segkit.runs.trusted), a loss's binary/multiclass mode (segkit.config.validate_config reads the
class's `mode`), the dataset schemas Hydra checks (segkit.cli.common.register_configs), the formats
segkit-init-config proposes (segkit.tools.layout) and the extra a tracker names when it is missing.

Parts are found by importing the modules that register them, kind by kind, when that kind is first
asked for: segkit's own modules (SEGKIT_MODULES) and every entry point of the `segkit.parts` group
whose name is the kind or starts with `<kind>.` (`loss = "my_package.losses"` in the user's
pyproject). Dataset schemas are torch-free, so composing a config still answers before torch loads.
This module imports only segkit.errors: it sits just above it, below segkit.config.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, TypeVar

from segkit.errors import SegkitError

ENTRY_POINT_GROUP = "segkit.parts"
KINDS = ("model", "dataset", "loss", "schedule", "augmentation", "tracker")
# The modules that register segkit's own parts (`package.*`: each module of the package, so a new tracker
# module needs no line here). Imported by name, not by an import statement: this low layer imports none
# of the layers above it at the top; importing a module is what registers its parts.
SEGKIT_MODULES: dict[str, tuple[str, ...]] = {
    "model": ("segkit.models.build",),
    "dataset": ("segkit.data.readers.schemas",),
    "loss": ("segkit.losses",),
    "schedule": ("segkit.engine.optim",),
    "augmentation": ("segkit.augment",),
    "tracker": ("segkit.trackers.*",),
}
T = TypeVar("T")


@dataclass(frozen=True)
class Part:
    kind: str  # one of KINDS
    target: str  # what a config's `_target_` names: `module.Name`
    name: str = ""  # a dataset format's name: its schema is `dataset/<name>_schema`, its reader module <name>.py
    schema: type | None = None  # dataset: the dataclass of its config keys (torch-free)
    detect: str | None = None  # dataset: `module.function(root) -> Layout | None` for segkit-init-config
    extra: str | None = None  # the pip extra the part needs (`pip install 'segkit[<extra>]'`)
    requires: tuple[str, ...] = field(default=())  # the modules that extra brings


_parts: dict[str, Part] = {}  # target -> part
_loaded: set[str] = set()  # kinds whose modules have been imported


def register(kind: str, target: str | None = None, **details: Any) -> Callable[[T], T]:
    """Register a part. As a decorator on a class or function its target is where it is defined;
    called with `target`, it registers that name (one re-exported elsewhere) at once. Registering a
    target again with the same details is harmless, with other details an error."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    if target is not None:
        _add(Part(kind, target, **details))
        return lambda obj: obj

    def add(obj: T) -> T:
        _add(Part(kind, f"{obj.__module__}.{obj.__qualname__}", **details))  # type: ignore[attr-defined]
        return obj

    return add


def _add(part: Part) -> None:
    if _parts.setdefault(part.target, part) != part:
        raise ValueError(f"{part.target} is registered twice, differently: {_parts[part.target]} and {part}")


def dataset_format(name: str, detect: str | None = None) -> Callable[[T], T]:
    """Register a dataset format on its schema dataclass, whose `_target_` default names the reader class.
    `detect` names a function segkit-init-config asks whether a directory holds this format
    (segkit.tools.layout.detect_layout); segkit's own formats are detected there."""

    def add(schema: T) -> T:
        register("dataset", schema._target_, name=name, schema=schema, detect=detect)  # type: ignore[attr-defined]
        return schema

    return add


def parts(kind: str) -> list[Part]:
    """Every registered part of `kind`, segkit's and the installed packages', in registration order."""
    _load(kind)
    return [part for part in _parts.values() if part.kind == kind]


def targets(*kinds: str) -> frozenset[str]:
    return frozenset(part.target for kind in kinds for part in parts(kind))


def find(target: Any, kind: str) -> Part | None:
    """The registered part of `kind` a `_target_` names, or None (also for a value that is no name)."""
    _load(kind)
    part = _parts.get(target) if isinstance(target, str) else None
    return part if part is not None and part.kind == kind else None


def registered(obj: Any) -> Part | None:
    """The part a class or function registered; importing its module did, so nothing is loaded here."""
    return _parts.get(f"{obj.__module__}.{obj.__qualname__}")


def dataset_formats() -> dict[str, Part]:
    """format name -> its part (schema and reader)."""
    return {part.name: part for part in parts("dataset")}


def loss_mode(target: Any) -> str | None:
    """The `mode` attribute (binary / multiclass) of a registered loss class; None for anything else.
    Only registered targets are imported, so a config cannot make this import a module it names."""
    if not isinstance(target, str) or find(target, "loss") is None:
        return None
    return getattr(load(target), "mode", None)


def load(target: str) -> Any:
    """The object a registered target names."""
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _load(kind: str) -> None:
    if kind in _loaded:
        return
    _loaded.add(kind)  # first: a module being imported may ask for its own kind
    try:
        for module in SEGKIT_MODULES.get(kind, ()):
            _import(module)
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            if entry.name == kind or entry.name.startswith(f"{kind}."):
                _load_entry_point(entry)
    except BaseException:
        _loaded.discard(kind)  # asked again, the kind is loaded again (and fails again, visibly)
        raise


def _import(module: str) -> None:
    if not module.endswith(".*"):
        importlib.import_module(module)
        return
    package = importlib.import_module(module.removesuffix(".*"))
    for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        importlib.import_module(info.name)


def _load_entry_point(entry: Any) -> None:
    """Import an installed package's registering module; a broken one is one line naming it."""
    try:
        entry.load()
    except Exception as error:  # noqa: BLE001 - any failure inside someone else's module
        where = f"{entry.dist.name} {entry.dist.version}" if entry.dist is not None else "an installed package"
        raise SegkitError(f"{ENTRY_POINT_GROUP} entry point {entry.name} = {entry.value} ({where}) failed to "
                          f"import: {type(error).__name__}: {error}") from error
