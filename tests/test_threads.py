"""CPU threads: the host's cores divided among the training processes segkit runs on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from segkit.engine.threads import HostShare, plan_threads, usable_cores
from segkit.engine.trainer import Trainer, fit

from .conftest import CONF_DIR, TINY


@pytest.fixture(autouse=True)
def no_omp_setting(monkeypatch):
    """The suite runs with OMP_NUM_THREADS=1 (conftest), which the division defers to: not here."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def plan(cores: int, trainings: int = 1, workers: int = 2, requested: int | None = None,
         omp: str | None = None) -> int:
    return plan_threads(requested, cores=cores, processes=trainings, workers=workers, omp_num_threads=omp,
                        counted="test").threads


def test_the_cores_are_divided_among_the_trainings():
    assert plan(2) == 2  # one run alone keeps every core of a small host
    assert plan(2, trainings=2) == 1  # two trainings on 2 cores: one thread each, not two contending
    assert plan(16, trainings=8) == 2
    assert plan(1, trainings=4) == 1  # never 0
    assert plan(3, trainings=2) == 1


def test_a_large_share_leaves_one_core_to_the_loader_workers():
    assert plan(16, trainings=2) == 7
    assert plan(16, trainings=2, workers=0) == 8  # no workers to leave room for
    assert plan(6, trainings=2) == 3  # a share of 3 would lose a third: kept whole


def test_an_explicit_setting_wins_over_the_division():
    assert plan(16, trainings=2, requested=3) == 3
    assert plan(16, trainings=4, omp="5") == 5
    assert plan(16, trainings=4, omp="5,2") == 5  # OpenMP's nested form: the outermost level is torch's
    assert plan(16, trainings=4, omp="junk") == 1


def test_a_container_cpu_quota_caps_the_cores(tmp_path):
    affinity = usable_cores(tmp_path / "absent")
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs: two threads can run, the second part of the time
    assert usable_cores(quota) == min(affinity, 2)
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == affinity
    quota.write_text("garbage")
    assert usable_cores(quota) == affinity


def test_trainings_on_one_host_divide_its_cores_and_take_them_back(tmp_path):
    cores = usable_cores()
    first = HostShare(None, workers=0, folder=tmp_path)
    with first.held():
        assert first.live_trainings() == 1 and first.plan.threads == cores
        second = HostShare(None, workers=0, folder=tmp_path)
        assert second.plan.threads == max(1, cores // 2)  # counted before it runs: the first and itself
        with second.held():
            assert second.live_trainings() == first.live_trainings() == 2
            assert second.plan.threads == max(1, cores // 2)
            changed = first.refresh()
            assert first.plan.threads == max(1, cores // 2)
            assert (changed is not None) == (cores >= 2)  # on one core nothing changes, and refresh says so
        assert first.live_trainings() == 1
        first.refresh()
        assert first.plan.threads == cores
    assert HostShare(None, workers=0, folder=tmp_path).live_trainings() == 1


def test_a_share_that_is_not_running_is_not_counted(tmp_path):
    """Built, not run (a Trainer made to validate, a federated client between rounds, one whose run raised):
    the other trainings keep their cores."""
    built = HostShare(None, workers=0, folder=tmp_path)
    with pytest.raises(RuntimeError), built.held():
        assert HostShare(None, workers=0, folder=tmp_path).live_trainings() == 2
        raise RuntimeError("the run failed")
    assert HostShare(None, workers=0, folder=tmp_path).live_trainings() == 1


def test_a_built_trainer_holds_no_slot_until_it_runs(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, "trainer.max_steps=1"])
    before = torch.get_num_threads()
    try:
        trainer = Trainer(cfg, tmp_path / "run")
        assert trainer.cpu_share.counting
        assert HostShare(None, workers=0).live_trainings() == 1  # the session's slot folder (conftest)
    finally:
        torch.set_num_threads(before)


def test_a_training_that_dies_gives_its_slot_back(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_SLOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        share = HostShare(None, workers=0, folder=tmp_path)
        assert share.live_trainings() == 2
        holder.kill()  # no clean-up code runs: the kernel drops the lock with the process
        holder.wait(timeout=30)
        assert share.live_trainings() == 1
    finally:
        holder.kill()


HOLD_A_SLOT = """
import sys, time
from pathlib import Path
from segkit.engine.threads import HostShare
with HostShare(None, workers=0, folder=Path(sys.argv[1])).held():
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_planted_or_shared_slot_folder_is_not_used(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "planted").symlink_to(elsewhere)
    share = HostShare(None, workers=0, folder=tmp_path / "planted")
    with share.held():
        assert share.slot is None and not list(elsewhere.iterdir())  # nothing written through the link
    assert share.plan.threads == usable_cores()  # undivided, as before the slots existed
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # others could plant slot files to make our runs starve
    assert HostShare(None, workers=0, folder=shared).slot is None


def test_the_run_logs_and_records_its_share(tmp_path, caplog):
    """A training beside another live one (a process holding a slot) takes half the cores, and says why."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_SLOT, os.environ["SEGKIT_RUNTIME_DIR"] + "/cpu-slots"],
                              stdout=subprocess.PIPE, text=True)
    before = torch.get_num_threads()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, "trainer.max_steps=1"])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with caplog.at_level("INFO", logger="segkit"):
            summary = fit(cfg, tmp_path / "run")
    finally:
        holder.kill()
        holder.wait(timeout=30)
        torch.set_num_threads(before)
    expected = max(1, usable_cores() // 2)
    assert summary["torch_threads"] == expected
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["torch_threads"] == expected
    assert f"torch threads: {expected} ({usable_cores()} cores / 2 live training(s) on this host)" in caplog.text


def test_an_explicit_thread_count_is_used_as_given(tmp_path, caplog):
    before = torch.get_num_threads()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, "trainer.max_steps=1", "trainer.threads=2"])
    try:
        with caplog.at_level("INFO", logger="segkit"):
            assert fit(cfg, tmp_path / "run")["torch_threads"] == 2
    finally:
        torch.set_num_threads(before)
    assert "torch threads: 2 (trainer.threads)" in caplog.text
