"""A tracker named by a non-string key is refused: `logger.7.subdir` is no key path OmegaConf.select finds,
so its destination went unchecked (a run config could have training write anywhere)."""

from __future__ import annotations

from pathlib import Path

import pytest

from segkit.errors import UntrustedConfigError
from segkit.runs.trusted import check_run_config, foreign_run_config

TRACKER = "    _target_: segkit.trackers.tensorboard.TensorBoardTracker\n    subdir: /elsewhere/runs\n"


def saved_config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "run" / ".hydra" / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(f"logger:\n  {name}:\n{TRACKER}")
    return path


@pytest.mark.parametrize("name", ["7", "? !!binary YWJj\n  "])
def test_run_check_refuses_a_tracker_without_a_string_name(tmp_path, name):
    path = saved_config(tmp_path, name)
    with pytest.raises(UntrustedConfigError, match="not a string key"):
        check_run_config(str(path))


def test_foreign_run_config_refuses_a_tracker_without_a_string_name(tmp_path):
    with pytest.raises(UntrustedConfigError, match=r"logger\.7: .*not a string key"):
        foreign_run_config(saved_config(tmp_path, "7"))


def test_a_string_name_is_still_checked_by_its_key(tmp_path):
    with pytest.raises(UntrustedConfigError, match=r"logger\.tb\.subdir: '/elsewhere/runs' refused"):
        check_run_config(str(saved_config(tmp_path, "tb")))
