"""What every tracker records about a run besides its config: Hydra overrides, code and library versions.

Kept in one place so MLflow, W&B and the sweep report name things the same way.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = {"torch": "torch", "timm": "timm", "smp": "segmentation-models-pytorch", "kornia": "kornia",
            "segkit": "segkit"}
MAX_RUN_NAME = 250


@dataclass
class RunContext:
    """The Hydra side of a run; empty when training is called outside a Hydra app (tests, notebooks)."""

    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option, e.g. model -> unet
    sweep_id: str | None = None  # the sweep directory of a multirun job
    job_num: int | None = None

    @property
    def run_name(self) -> str:
        name = ",".join(self.overrides) or "run"
        if self.job_num is not None:
            name = f"#{self.job_num} {name}"
        return name[:MAX_RUN_NAME]


def hydra_context() -> RunContext:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return RunContext()
    hc = HydraConfig.get()
    choices = {str(k): str(v) for k, v in (hc.runtime.choices or {}).items()
               if v is not None and not str(k).startswith("hydra/")}
    context = RunContext(overrides=list(hc.overrides.task), choices=choices)
    if hc.mode == RunMode.MULTIRUN:
        context.sweep_id = str(Path(str(hc.sweep.dir)).resolve())
        context.job_num = int(hc.job.num)
    return context


@lru_cache(maxsize=1)
def git_state() -> tuple[str, str]:
    """(commit, dirty) of the checkout segkit runs from; ("unknown", "unknown") outside git."""
    where = Path(__file__).resolve().parent
    try:
        commit = _git(where, "rev-parse", "HEAD")
        dirty = bool(_git(where, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, str(dirty).lower()


def _git(where: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True,
                          timeout=10).stdout.strip()


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {}
    for short, dist in PACKAGES.items():
        try:
            versions[short] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[short] = "not installed"
    return versions


def run_tags(run_dir: Path, params: Mapping[str, Any], tags: Mapping[str, str],
             context: RunContext) -> dict[str, str]:
    """Flat string tags: overrides, git commit + dirty flag, versions, device, seed, sweep id, choices."""
    commit, dirty = git_state()
    out = {
        "overrides": json.dumps(context.overrides),
        "git.commit": commit,
        "git.dirty": dirty,
        "seed": str(params.get("trainer.seed", "")),
        "run_dir": str(Path(run_dir).resolve()),
        **{f"version.{name}": version for name, version in package_versions().items()},
        **{f"choice.{group}": option for group, option in context.choices.items()},
        **{str(k): str(v) for k, v in tags.items()},
    }
    if context.sweep_id is not None:
        out["sweep_id"] = context.sweep_id
        out["job_num"] = str(context.job_num)
    return out
