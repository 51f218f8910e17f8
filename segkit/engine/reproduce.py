"""Train again from a run's saved composition (`<run>/.hydra/config.yaml`) and say whether it came out the same.

The config the run composed (after its overrides), not today's conf/ defaults. A run directory may come
from someone else, so by default its config is data: parsed into segkit's TrainConfig schema and checked
(segkit.runs.trusted.foreign_run_config), never composed by Hydra, never handed to logging's dictConfig;
the caller's overrides are applied as values and the new run goes where the caller says (`out`). The new
run gets its own `.hydra/config.yaml` so it can be reproduced in turn. With `trust`, the run is composed
as `python train.py --config-dir <run>/.hydra --config-name config hydra.run.dir=<out>` would (Hydra's
grammar, `${hydra:...}`, its logging config): only for your own runs. Relative paths in the config
(dataset.root) resolve against the current directory, as for the original run.
"""

from __future__ import annotations

import copy
import json
import logging.config
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf, open_dict

from segkit import safe_files
from segkit.errors import ConfigError
from segkit.runs.run_dir import RunDir

log = logging.getLogger(__name__)

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


def default_out(run_dir: str | Path) -> Path:
    """`outputs/reproductions/<run name>_<time>` below the current directory: never inside the run directory."""
    import time

    return Path("outputs") / "reproductions" / f"{Path(run_dir).resolve().name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"


def reproduce(run_dir: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None,
              trust: bool = False) -> Reproduction:
    """Train the run in `run_dir` again into `out` (default `default_out(run_dir)`) and compare.

    Unless `trust`, the saved config is parsed as data and checked like any file from someone else
    (segkit.runs.trusted.foreign_run_config); `overrides` are the caller's own. With `trust`, like the
    Hydra app, this composes with Hydra and configures logging and Hydra's run config for the process."""
    from segkit.engine.trainer import fit
    from segkit.safe_files import is_regular_file

    original = RunDir(Path(run_dir).resolve())
    if not is_regular_file(original.hydra_config):
        raise ConfigError("run_dir", f"{original.hydra_config}: not found or not a regular file "
                                     f"(is {run_dir} a run directory?)")
    out = Path(out or default_out(run_dir)).absolute()
    if trust:
        return _reproduce_trusted(original, overrides, out)
    from segkit.runs.trusted import foreign_run_config

    job = foreign_run_config(original.hydra_config, overrides)
    if not any(o.partition("=")[0].lstrip("+~") == "output_root" for o in overrides):
        job.output_root = str(out)  # the trackers' stores (MLflow's database) go with the new run, not elsewhere
    again = RunDir(out)
    safe_files.make_dirs(again.hydra, root=out.parent)
    with _log_to(again.path / "train.log"):
        job.trainer.threads = _threads_as_the_original(original, job.trainer.threads, overrides) or job.trainer.threads
        safe_files.write_text(again.hydra_config, OmegaConf.to_yaml(job), root=out)
        safe_files.write_text(again.hydra_overrides, OmegaConf.to_yaml(list(overrides)), root=out)
        fit(job, out)
    return _compared(original, again)


def _threads_as_the_original(original: RunDir, configured: int | None, overrides: Sequence[str]) -> int | None:
    """N when the original trained with N torch threads throughout and neither its config (`configured`) nor
    the caller's overrides fixed a number. A CPU run's float sums depend on how many threads split them, and
    the default share (the cores divided among the host's live trainings) would make the re-run's result
    depend on what else runs beside it. None when the count changed during the original (the re-run cannot
    follow that; it says so) or when this host has fewer cores (it says to pass trainer.threads=N: exact, slower).
    """
    from segkit.engine.threads import usable_cores

    if configured is not None or any(o.partition("=")[0].lstrip("+~") == "trainer.threads" for o in overrides):
        return None
    shares = (original.read_metrics() or {}).get("torch_threads_by_step")
    if not isinstance(shares, list):
        return None
    counts = {share[1] for share in shares
              if isinstance(share, list) and len(share) == 2 and type(share[1]) is int and 0 < share[1] <= 4096}
    if len(counts) > 1:
        log.warning("%s: the torch thread count changed during the run (%s as [step, threads]); the re-run "
                    "cannot follow that, so its last digits may differ", original.metrics, shares[:8])
    if len(counts) != 1:
        return None
    threads, cores = counts.pop(), usable_cores()
    if threads > cores:
        log.warning("%s: the run trained with %d torch threads, this host has %d usable cores; for an exact "
                    "repetition pass trainer.threads=%d (slower)", original.metrics, threads, cores, threads)
        return None
    log.info("trainer.threads=%d, as the original trained (its float sums depend on it)", threads)
    return threads


def _compared(original: RunDir, again: RunDir) -> Reproduction:
    before = original.read_metrics()
    after = again.read_metrics() or {}
    return Reproduction(again, after, None if before is None else compare(before, after))


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """segkit's own logging for the run: the console and `train.log`, as a training run logs."""
    from segkit.safe_files import LogFile

    root = logging.getLogger()
    handlers: list[logging.Handler] = [logging.StreamHandler(), LogFile(str(path))]
    formatter = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    level = root.level
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


def _reproduce_trusted(original: RunDir, overrides: Sequence[str], out: Path) -> Reproduction:
    from hydra.core.hydra_config import HydraConfig

    from segkit.engine.trainer import fit

    cfg = compose_saved(original, out, overrides)
    HydraConfig.instance().set_config(cfg)  # for `${hydra:...}` in the config and the trackers' run context
    again = RunDir(out)
    again.hydra.mkdir(parents=True, exist_ok=True)
    job_logging = cast(dict[str, Any], OmegaConf.to_container(cfg.hydra.job_logging, resolve=True))
    logging.config.dictConfig(job_logging)  # as the app logs
    with open_dict(cfg):  # after the logging config, so what it decides is logged
        cfg.trainer.threads = _threads_as_the_original(original, cfg.trainer.threads, overrides) or cfg.trainer.threads
    job = copy.deepcopy(cfg)  # the job's config, as Hydra hands it to the app: without its own node
    with open_dict(job):
        del job["hydra"]
    safe_files.write_text(again.hydra_config, OmegaConf.to_yaml(job))
    safe_files.write_text(again.hydra_settings, OmegaConf.to_yaml({"hydra": cfg.hydra}))
    safe_files.write_text(again.hydra_overrides, OmegaConf.to_yaml(list(overrides)))
    fit(job, out)
    return _compared(original, again)
