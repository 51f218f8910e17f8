"""Train again from a run's saved composition (`<run>/.hydra/config.yaml`) and say whether it came out the same.

What `python train.py --config-dir <run>/.hydra --config-name config hydra.run.dir=<out>` would do, as a
function: the config the run composed (after its overrides), not today's conf/ defaults, composed
with Hydra (so overrides use its grammar and `${hydra:...}` resolves), logged like a Hydra job, with
the new run's own `.hydra/` record so it can be reproduced in turn. Relative paths in the config
(dataset.root) resolve against the current directory, as for the original run.
"""

from __future__ import annotations

import copy
import json
import logging.config
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf, open_dict

from segkit.errors import ConfigError
from segkit.runs.run_dir import RunDir

COMPARED = ("status", "steps", "epochs", "best_score", "best_epoch", "final", "best")  # keys of metrics.json


@dataclass
class Reproduction:
    run: RunDir  # the new run
    summary: dict[str, Any]  # its metrics.json
    differ: list[str] | None  # COMPARED keys that differ from the original; None: the original has no summary


def compare(original: dict[str, Any], again: dict[str, Any]) -> list[str]:
    """Keys of the run summary whose values differ (final/best metrics, steps, status)."""
    return [key for key in COMPARED if _canonical(original.get(key)) != _canonical(again.get(key))]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def compose_saved(original: RunDir, out: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The run's saved config with `overrides`, and Hydra's node for a run in `out`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(original.hydra.resolve()), version_base="1.3", job_name="train"):
        cfg = compose(original.hydra_config.stem, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.run.dir = str(out)
        cfg.hydra.runtime.output_dir = str(out)
    return cfg


def reproduce(run_dir: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None,
              trust: bool = False) -> Reproduction:
    """Train the run in `run_dir` again into `out` (default `<run>/reproductions/<time>`) and compare.

    Unless `trust`, the saved config is first checked like any file from someone else
    (segkit.runs.trusted.check_run_config); `overrides` are the caller's own. Like the Hydra app,
    this configures logging and Hydra's run config for the process."""
    import time

    from hydra.core.hydra_config import HydraConfig

    from segkit.engine.trainer import fit
    from segkit.runs.trusted import check_run_config

    original = RunDir(Path(run_dir).resolve())
    if not original.hydra_config.is_file():
        raise ConfigError("run_dir", f"{original.hydra_config}: not found (is {run_dir} a run directory?)")
    if not trust:
        check_run_config(str(original.hydra_config), overrides)
    out = Path(out or original.path / "reproductions" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    cfg = compose_saved(original, out, overrides)
    HydraConfig.instance().set_config(cfg)  # for `${hydra:...}` in the config and the trackers' run context
    again = RunDir(out)
    again.hydra.mkdir(parents=True, exist_ok=True)
    job_logging = cast(dict[str, Any], OmegaConf.to_container(cfg.hydra.job_logging, resolve=True))
    logging.config.dictConfig(job_logging)  # as the app logs
    job = copy.deepcopy(cfg)  # the job's config, as Hydra hands it to the app: without its own node
    with open_dict(job):
        del job["hydra"]
    again.hydra_config.write_text(OmegaConf.to_yaml(job))
    again.hydra_settings.write_text(OmegaConf.to_yaml({"hydra": cfg.hydra}))
    again.hydra_overrides.write_text(OmegaConf.to_yaml(list(overrides)))
    fit(job, out)
    before, after = original.read_metrics(), again.read_metrics() or {}
    return Reproduction(again, after, None if before is None else compare(before, after))
