"""Optional parts installed as pip extras (pyproject.toml): one line naming the extra when one is missing."""

from __future__ import annotations

import importlib

from segkit import registry
from segkit.errors import ConfigError


def require_extra(key: str, extra: str, *modules: str) -> None:
    """Import `modules`; if one is not installed, raise ConfigError(key) saying which extra brings it.

    Called where the user's choice is built (a tracker's constructor, the exporter), so the run stops
    before any data is read: `error: logger.wandb: needs the 'wandb' extra: pip install 'segkit[wandb]'`.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            fix = f"needs the '{extra}' extra: pip install 'segkit[{extra}]'"
            missing = isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == module
            # Installed but broken (e.g. one of its own dependencies is missing): say what failed too.
            raise ConfigError(key, fix if missing else f"{fix} ({module} failed to import: {error})") from None


def require_extras_of(key: str, part: object) -> None:
    """require_extra with the extra and modules `part` (a class or function) registered in segkit.registry."""
    found = registry.registered(part)
    if found is not None and found.extra:
        require_extra(key, found.extra, *found.requires)
