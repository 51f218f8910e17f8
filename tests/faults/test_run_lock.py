"""One live run per directory (segkit/engine/run_lock.py) and workers that never outlive their launcher
(segkit/engine/watchdog.py). Small processes without torch where a process is needed; the torchrun
campaign that uses both is tests/faults/test_kill_campaign.py."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from segkit.cli import evaluate as evaluate_cli
from segkit.cli import export as export_cli
from segkit.cli import predict as predict_cli
from segkit.engine.run_lock import LOCK_NAME, RunDirectoryBusy, RunLock
from segkit.engine.trainer import fit

from ..conftest import ROOT
from ..test_evaluate import compose_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock, prctl and /proc are Linux's")

# A process that takes the run directory's lock, forks a child that would outlive it (as a DataLoader
# worker can, for a few seconds), says "held" and waits to be killed.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from segkit.engine.run_lock import RunLock
    lock = RunLock()
    lock.acquire(Path(sys.argv[1]), "training")
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    print("held", flush=True)
    time.sleep(60)
""")


def start_holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def holder(tmp_path):
    """A live owner of tmp_path/run; killed (SIGKILL, with its forked child) at the end of the test."""
    proc = start_holder(tmp_path / "run")
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_live_owner_refuses_others_and_a_killed_one_is_taken_over_saying_so(tmp_path, holder, caplog):
    run_dir = tmp_path / "run"
    with pytest.raises(RunDirectoryBusy) as refused:
        RunLock().acquire(run_dir, "training")
    message = str(refused.value)
    assert f"in use by training, pid {holder.pid}" in message and "-c" in message  # its command line
    assert f"kill {holder.pid}" in message and "\n" not in message

    holder.send_signal(signal.SIGKILL)  # its forked child lives on: it must not keep the lock
    holder.wait()
    lock = RunLock()
    with caplog.at_level(logging.WARNING, logger="segkit"):
        lock.acquire(run_dir, "training")
    assert f"taking over the lock of training, pid {holder.pid}" in caplog.text and "killed?" in caplog.text
    lock.release()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segkit"):
        RunLock().acquire(run_dir, "training")  # after a clean release: nothing to report
    assert "taking over" not in caplog.text


def test_a_second_lock_in_the_same_process_is_refused_too(tmp_path):
    first = RunLock()
    first.acquire(tmp_path, "training")
    with pytest.raises(RunDirectoryBusy, match=f"pid {os.getpid()}"):
        RunLock().acquire(tmp_path, "evaluation")
    first.release()
    RunLock().acquire(tmp_path, "evaluation")


def test_training_into_a_live_run_directory_is_refused_before_writing_anything(compose_cfg, tmp_path, holder):
    run_dir = tmp_path / "run"
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(RunDirectoryBusy, match=f"pid {holder.pid}"):
        fit(compose_cfg(["trainer.resume=auto"]), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == before == [LOCK_NAME]


def test_evaluate_predict_and_export_into_a_live_run_directory_are_refused(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    fit(compose_cfg([]), run_dir)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(images / "a.png")
    tools = [
        (evaluate_cli, compose_config("evaluate", [f"checkpoint={checkpoint}", "report=false",
                                                   "progress_bar=false"]), run_dir / "eval"),
        (predict_cli, compose_config("predict", [f"checkpoint={checkpoint}", f"input={images}",
                                                 f"output={run_dir / 'predictions'}", "progress_bar=false"]),
         run_dir / "predictions"),
        (export_cli, compose_config("export", [f"checkpoint={checkpoint}", "benchmark=false"]),
         run_dir / "checkpoints" / "last.onnx"),
    ]
    proc = start_holder(run_dir)
    try:
        for tool, cfg, output in tools:
            with pytest.raises(RunDirectoryBusy, match=f"pid {proc.pid}"):
                tool.run(cfg)
            assert not output.exists(), tool.__name__
        elsewhere = compose_config("predict", [f"checkpoint={checkpoint}", f"input={images}",
                                               f"output={tmp_path / 'elsewhere'}", "progress_bar=false"])
        assert predict_cli.run(elsewhere) == 0  # reading the live run's checkpoint is fine
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert predict_cli.run(tools[1][1]) == 0  # the owner gone, the same command works
    assert (run_dir / "predictions" / "a.png").is_file()


# A launcher (started in its own session, as the test kills it by group) that starts a worker in another
# session, as torchrun does, and waits. The worker arms the watchdog and sleeps; `mode` disables one of
# the two ways it notices, so each is proven alone.
LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True,
                              env={**os.environ, "TORCHELASTIC_RUN_ID": "test"})
    print(worker.pid, flush=True)
    time.sleep(60)
""")
WORKER = textwrap.dedent("""
    import sys, time
    from segkit.engine import watchdog
    if sys.argv[1] == "signal":
        watchdog.WATCH_INTERVAL_S = 3600  # the thread would notice only in an hour
    elif sys.argv[1] == "thread":
        watchdog._set_parent_death_signal = lambda signum: None  # no prctl: the thread alone
    watchdog.exit_with_launcher("rank 1", "restart with trainer.resume=auto")
    print("armed", flush=True)
    while sys.argv[1] == "stuck":  # blocked in a write to a full pipe, holding sys.stderr's lock
        sys.stderr.write("x" * 4096)
    time.sleep(60)
""")


@pytest.mark.parametrize("mode", ["signal", "thread", "stuck"])
def test_a_worker_exits_within_seconds_of_its_launcher_saying_so(mode):
    read_end, write_end = os.pipe()  # the worker's stderr; read only at the end (a full pipe when "stuck")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER, mode], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=write_end, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(write_end)
    assert launcher.stdout is not None
    worker = int(launcher.stdout.readline())
    try:
        assert launcher.stdout.readline().strip() == "armed"  # the worker writes into the same pipe
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's group; the worker is in its own session
        launcher.wait()
        killed = time.time()
        while _alive(worker) and time.time() < killed + 10:
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its launcher by 10 s"
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
        with os.fdopen(read_end) as stderr:
            lines = [line for line in stderr.read().splitlines() if not line.startswith("xxxx")]
    if mode != "stuck":  # stuck: the line cannot get into the full pipe; the exit must happen anyway
        assert lines == [f"error: rank 1 (pid {worker}): its launcher (pid {launcher.pid}) is gone, exiting; "
                         "restart with trainer.resume=auto"], lines


def _alive(pid: int) -> bool:
    """Running, not a zombie (a container's init may be slow to reap the orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
