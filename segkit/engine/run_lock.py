"""One live run per directory: a process that writes into a run directory holds its lock while it lives.

The lock is `flock` on `<run dir>/run.lock`. The kernel releases it when its owner exits in any way
(SIGKILL and the OOM killer included), so a dead owner never blocks a restart. The file also records
who holds the lock (pid, host, command, purpose, start time): a second process gets one line naming the
owner and how to stop it; a record left behind by an owner that was killed is reported and replaced.

Forked children (DataLoader workers) close their copy of the lock file at once: a lock must not stay
held by a worker that outlives its killed parent for a few seconds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from segkit.engine.distributed import DistContext, broadcast_from_main
from segkit.engine.watchdog import exit_with_launcher
from segkit.errors import SegkitError
from segkit.safe_files import is_regular_file, open_lock

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunDirectoryBusy(SegkitError):
    """Another live process owns the run directory."""


class RunLock:
    """The lock of one run directory, held from `acquire` to `release` (or the end of the process)."""

    def __init__(self) -> None:
        self._handle: IO[str] | None = None
        _held_locks.add(self)

    def acquire(self, run_dir: Path, purpose: str) -> None:
        """Take the lock at once or raise RunDirectoryBusy naming its owner; never waits."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        handle = open_lock(path)  # held open for the lock's lifetime; never through a link planted in run_dir
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_record(handle)
            handle.close()
            raise RunDirectoryBusy(f"{run_dir}: in use by {_describe(owner)}; wait for it to end or stop it with "
                                   f"`kill {owner.get('pid', '<pid>')}`, then run again") from None
        previous = _read_record(handle)
        if previous:  # a clean release empties the record: its owner was killed
            log.warning("%s: taking over the lock of %s, which ended without releasing it (killed?)",
                        run_dir, _describe(previous))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                                 "command": shlex.join(sys.orig_argv), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self._handle = handle

    def acquire_for_job(self, run_dir: Path, ctx: DistContext, purpose: str) -> None:
        """Rank 0 owns the lock for the whole job; every process of the job fails together if it is taken."""
        refused = None
        if ctx.is_main:
            try:
                self.acquire(run_dir, purpose)
            except RunDirectoryBusy as error:
                refused = str(error)
        refused = broadcast_from_main(refused, ctx)
        if refused is not None:
            raise RunDirectoryBusy(refused)

    def release(self) -> None:
        """Empty the record (a later owner sees a clean release) and unlock; does nothing if not held."""
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.close()  # closing the last descriptor releases the flock
        self._handle = None


@contextmanager
def guard_run_dir(output: Path, purpose: str) -> Iterator[Path | None]:
    """For the tools that write next to a run's outputs (evaluate, predict, export): when `output` lies
    in a run directory, hold that run's lock while writing; and never outlive a launcher. Yields the run
    directory, or None when `output` is outside any run directory."""
    exit_with_launcher(purpose)
    run_dir = enclosing_run_dir(output)
    lock = RunLock()
    if run_dir is not None:
        lock.acquire(run_dir, purpose)
    try:
        yield run_dir
    finally:
        lock.release()


def enclosing_run_dir(path: Path) -> Path | None:
    """The nearest directory at or above `path` that a training run marked as its own (it holds run.lock)."""
    for directory in (path.expanduser().absolute(), *path.expanduser().absolute().parents):
        if is_regular_file(directory / LOCK_NAME):
            return directory
    return None


def _read_record(handle: IO[str]) -> dict[str, Any]:
    handle.seek(0)
    text = handle.read().strip()
    try:
        record = json.loads(text) if text else {}
    except json.JSONDecodeError:  # a record half written when its owner was killed
        return {"pid": "?", "command": "unknown (damaged lock record)"}
    return record if isinstance(record, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    host = owner.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f", since {owner['since']}" if owner.get("since") else ""
    command = " ".join(str(owner.get("command", "command unknown")).split())  # one line, whatever argv held
    return f"{owner.get('purpose', 'a process')}, pid {owner.get('pid', '?')}{where}{since} ({command})"


_held_locks: weakref.WeakSet[RunLock] = weakref.WeakSet()


def _close_in_forked_child() -> None:
    for lock in list(_held_locks):
        if lock._handle is not None:
            lock._handle.close()  # the child's descriptor only: the parent keeps the lock
            lock._handle = None


os.register_at_fork(after_in_child=_close_in_forked_child)
