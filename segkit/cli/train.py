"""`python train.py <overrides>`: compose conf/train.yaml with Hydra and train."""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from segkit.cli.common import hydra_main, register_configs, run_or_exit
from segkit.config import validate_config
from segkit.search import run_trial, trial_number
from segkit.sweeps import run_sweep_job

register_configs()


def train(cfg: DictConfig, output_dir: str, on_validation=None) -> dict[str, Any] | None:
    """One training, or one side of a Flower federation (`federated=...`, segkit/federated.py).

    The trainer (torch and the models) is imported only here, after the config is checked, so
    `--help`, `--cfg job` and a config error answer before torch would have loaded. The trackers of
    the config's `logger` node are built here and handed to the run."""
    from segkit.trackers.base import build_trackers

    if cfg.get("federated") is not None:
        from segkit.federated import run

        return run(cfg, output_dir, build_trackers(cfg.get("logger")))
    validate_config(cfg)
    from segkit.engine.trainer import fit

    return fit(cfg, output_dir, on_validation, trackers=build_trackers(cfg.get("logger")))


@hydra_main("train")
def main(cfg: DictConfig) -> float | None:
    """Returns the best monitored metric (what a plain Hydra sweeper would optimise)."""
    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # A failing job (a bad combination) is written to <job dir>/failed.json and marked FAILED
        # in the trackers; it returns None and the sweep goes on (segkit/sweeps.py).
        def job(on_validation=None):
            return run_sweep_job(lambda: train(cfg, output_dir, on_validation), cfg, output_dir,
                                 hydra_cfg.overrides.task)

        # A trial of hparams_search=optuna reports each validation to its study (segkit/search.py).
        summary = run_or_exit(lambda: run_trial(cfg, output_dir, job) if trial_number() is not None else job())
        if summary is None:
            return None
    else:
        summary = run_or_exit(lambda: train(cfg, output_dir))
        if summary is None:  # a federated client: the server keeps the record
            return None
    if str(summary.get("stop_reason") or "").startswith("SIG"):
        print(f"error: interrupted by {summary['stop_reason']} at step {summary['steps']}; resume with "
              f"hydra.run.dir={output_dir} trainer.resume=auto", file=sys.stderr)
        sys.exit(130)
    return summary["best_score"]


if __name__ == "__main__":
    main()
