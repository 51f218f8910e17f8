"""segkit.runs.run_dir: the trainer writes where RunDir says, and every reader of a run finds it there."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segkit.cli.evaluate import default_output_dir
from segkit.engine.trainer import fit
from segkit.errors import ConfigError
from segkit.inference.predictor import load
from segkit.runs.run_dir import BEST, LAST, RunDir
from segkit.sweeps import read_job
from segkit.trackers.base import Tracker, build_trackers

from .conftest import CONF_DIR


def test_trainer_and_readers_of_a_run_share_one_layout(compose_cfg, tmp_path):
    cfg = compose_cfg(["dataset.class_names=[sky,road,car,tree]"])
    summary = fit(cfg, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    for path in (run.config, run.epochs_csv, run.metrics, run.checkpoint(LAST), run.checkpoint(BEST)):
        assert path.is_file(), path
    assert run.read_metrics() == json.loads(json.dumps(summary))
    best = run.checkpoint(BEST)
    assert RunDir.of_checkpoint(best) == run
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # segkit-evaluate's own config
        evaluate_cfg = compose(config_name="evaluate", overrides=[f"checkpoint={best}"])
    assert default_output_dir(evaluate_cfg, best) == run.eval_dir("best_val")
    assert load(best, "cpu").class_names == ["sky", "road", "car", "tree"]
    run.hydra.mkdir()
    run.hydra_config.write_text(OmegaConf.to_yaml(cfg))
    run.hydra_overrides.write_text("- trainer.max_epochs=1\n")
    job = read_job(run.path)  # the sweep report's view of the same directory
    assert job.status == "FINISHED" and job.overrides == ["trainer.max_epochs=1"]
    assert job.metrics is not None and job.metrics["best_score"] == summary["best_score"]


def test_build_trackers_skips_a_broken_one_only_when_asked():
    loggers = {"console": {"_target_": "segkit.trackers.base.ConsoleTracker"}, "off": None,
               "broken": {"_target_": "segkit.trackers.no_such_module.Tracker"}}
    kept = build_trackers(loggers, skip_broken=True)
    assert list(kept.active) == ["console"] and isinstance(kept.active["console"], Tracker)
    with pytest.raises(ConfigError, match="^logger.broken: "):  # a tracker that cannot be built fails the run
        build_trackers(loggers)
