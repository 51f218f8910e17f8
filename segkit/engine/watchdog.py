"""A worker never outlives its launcher.

torchrun starts each worker in its own session, so killing the launcher (or its whole process group,
as a job scheduler or the OOM killer does) leaves the workers running: they would go on writing into
the run directory, hold their ports and wait up to trainer.dist_timeout_s on peers that are gone. A
process started by a launcher therefore watches it in two ways, and exits saying so in one line:

- the kernel's parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`): delivered the moment the
  launcher dies; its handler runs as soon as the main thread runs Python again;
- a watchdog thread that checks the parent pid every WATCH_INTERVAL_S: it also acts while the main
  thread waits inside a collective or a long kernel, where no Python signal handler can run, and where
  prctl does not exist.

A process nobody launched (`python train.py`, perhaps under nohup) is not watched: it may outlive its shell.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

WATCH_INTERVAL_S = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEATH_SIGNAL = signal.SIGUSR1  # our own: SIGTERM already means "stop after this step"

EXIT_GRACE_S = 2.0  # the most that writing the one line may take

_armed: dict[str, object] = {}
_exiting = threading.Lock()


def launched_by_supervisor() -> bool:
    """Started by a launcher that owns this process's lifetime: torchrun, or one task of a multi-process job."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_with_launcher(who: str, advice: str = "") -> None:
    """When a launcher started this process, exit (status 1, one line on stderr) as soon as it is gone.
    `who` names this process in that line (e.g. "rank 1"), `advice` ends it. Does nothing otherwise;
    arms once per process."""
    if _armed or not launched_by_supervisor():
        return
    launcher = os.getppid()
    _armed.update(who=who, advice=f"; {advice}" if advice else "",
                  launcher="its launcher" if launcher == 1 else f"its launcher (pid {launcher})")
    if launcher == 1:  # already reparented to init: the launcher died while this process was starting
        _launcher_gone()
    if threading.current_thread() is threading.main_thread():
        signal.signal(DEATH_SIGNAL, lambda *_: _launcher_gone())
        _set_parent_death_signal(DEATH_SIGNAL)
    threading.Thread(target=_watch, args=(launcher,), name="segkit-launcher-watchdog", daemon=True).start()


def _set_parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def _watch(launcher: int) -> None:
    # Also catches a launcher that died before prctl was called (the signal is not sent retroactively).
    while os.getppid() == launcher:
        time.sleep(WATCH_INTERVAL_S)
    _launcher_gone()


def _launcher_gone() -> None:
    # Both paths may fire, and the main thread may be stuck writing to a full pipe while holding
    # sys.stderr's lock: no lock is waited for here, the line goes straight to fd 2, and a timer exits
    # anyway should even that write block.
    if not _exiting.acquire(blocking=False):
        return  # the other path is exiting already
    timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
    line = f"error: {_armed['who']} (pid {os.getpid()}): {_armed['launcher']} is gone, exiting{_armed['advice']}\n"
    with contextlib.suppress(OSError):  # stderr closed, or its reader died with the launcher
        os.write(2, line.encode())
    os._exit(1)  # now: no cleanup that could wait on peers that are gone too
