"""How many CPU threads torch may use in this process: the host's cores divided among segkit's trainings.

torch asks for every core by default. Two trainings side by side on one host then run twice as many
threads as there are cores, and OpenMP's busy-waiting threads make each far slower than half speed. So
each training process holds a slot on its host while it runs (an flock'ed file in a private per-user
folder, released by the kernel when the process ends, however it ends) and takes
cores / max(live slots, local ranks) threads; it counts the live slots again at every logging step, so a
run started alone gives half its cores back when a second one (a second command, a parallel sweep job, a
rank) starts, and takes them back when it ends. Loader workers run beside the trainings: when a share is
large, one of its cores is left to them.

`trainer.threads` set to a number wins; OMP_NUM_THREADS, set by the user or by a launcher (joblib's
workers get cores / n_jobs), wins over the division.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

# A share at least this large gives one core to the loader workers: the model then loses at most a quarter
# of its threads, while with 2 or 3 cores it would lose a half or a third for workers that mostly wait.
_SHARE_THAT_SPARES_A_CORE = 4
_MAX_SLOTS = 256  # more live trainings than this on one host: each counts as one of 256


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    reason: str  # for the log line: where the number came from


def usable_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may run on: its CPU affinity, capped by a container's CPU quota (cgroup v2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def local_ranks() -> int:
    """Training processes of this job on this host (set by torchrun, and for submitit tasks by segkit)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def plan_threads(requested: int | None, *, cores: int, processes: int, workers: int,
                 omp_num_threads: str | None, counted: str) -> ThreadPlan:
    """The thread count for one of `processes` trainings on `cores` cores; a pure function of its arguments.
    `counted` says, for the log, what the processes are."""
    if requested is not None:
        return ThreadPlan(requested, "trainer.threads")
    if omp_num_threads:
        outermost = omp_num_threads.split(",")[0].strip()  # OpenMP's nested form: the first level is torch's
        return ThreadPlan(max(1, int(outermost)) if outermost.isdigit() else 1, f"OMP_NUM_THREADS={omp_num_threads}")
    share = max(1, cores // max(1, processes))
    spare = 1 if workers > 0 and share >= _SHARE_THAT_SPARES_A_CORE else 0
    reason = f"{cores} cores / {counted}" + (", one core left to the loader workers" if spare else "")
    return ThreadPlan(share - spare, reason)


def slots_folder() -> Path:
    """The per-user folder of slot files: $SEGKIT_RUNTIME_DIR, else $XDG_RUNTIME_DIR/segkit, else a private
    folder in the temp directory."""
    if os.environ.get("SEGKIT_RUNTIME_DIR"):
        return Path(os.environ["SEGKIT_RUNTIME_DIR"]) / "cpu-slots"
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "segkit" / "cpu-slots"
    return Path(tempfile.gettempdir()) / f"segkit-{os.getuid()}" / "cpu-slots"


def _private_folder(folder: Path) -> bool:
    """Create `folder` (mode 0700) and check it is a real folder of ours that nobody else can write: a
    planted link or a shared folder in /tmp must not steer our files or fake our count."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _try_lock(path: Path, exclusive: bool) -> IO[bytes] | None:
    import fcntl

    flags = os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY
    try:
        handle = os.fdopen(os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "rb")
    except OSError:
        return None
    try:
        fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


class HostShare:
    """This process's share of the host's cores while it trains; `refresh()` follows the other trainings."""

    def __init__(self, requested: int | None, *, workers: int, folder: Path | None = None) -> None:
        self.requested, self.workers = requested, workers
        self.folder = folder or slots_folder()
        self.slot: IO[bytes] | None = None
        self.slot_path: Path | None = None
        # Slots are counted only when the division applies and the folder is a private one of ours.
        self.counting = requested is None and hasattr(os, "getuid") and _private_folder(self.folder)
        self.plan = self._plan()

    @contextmanager
    def held(self) -> Iterator[ThreadPlan]:
        """Hold a slot while the block runs (a run, not a Trainer merely built: the others count this one only
        then) and apply the plan counted again; the slot is given back however the block ends."""
        if self.counting:
            self._take_slot()
        try:
            self.plan = self._plan()
            yield self.apply()
        finally:
            if self.slot is not None:
                self.slot.close()  # the kernel drops the lock; the empty file stays for the next training
            self.slot, self.slot_path = None, None

    def _take_slot(self) -> None:
        for number in range(_MAX_SLOTS):
            path = self.folder / f"slot-{number}"
            handle = _try_lock(path, exclusive=True)
            if handle is not None:
                self.slot, self.slot_path = handle, path
                return

    def live_trainings(self) -> int:
        """Slots held by live processes, and this one (1 when the slots are not counted)."""
        if not self.counting:
            return 1
        live = 1
        for path in self.folder.glob("slot-*"):
            if path == self.slot_path:
                continue
            probe = _try_lock(path, exclusive=False)
            if probe is None:
                live += 1  # held by a live training (or unreadable: counted, the safe side)
            else:
                probe.close()
        return live

    def _plan(self) -> ThreadPlan:
        live, ranks = self.live_trainings(), local_ranks()
        # Ranks start together: before the others have taken their slots, the job's own count holds.
        counted = f"{live} live training(s) on this host" if live >= ranks else f"{ranks} ranks on this host"
        return plan_threads(self.requested, cores=usable_cores(), processes=max(live, ranks),
                            workers=self.workers, omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                            counted=counted)

    def apply(self) -> ThreadPlan:
        import torch  # here, not at the top: the entry point uses this module before torch is loaded

        torch.set_num_threads(self.plan.threads)
        return self.plan

    def refresh(self) -> ThreadPlan | None:
        """Count the live trainings again; the new plan when the thread count changed (and set it), else None."""
        if not self.counting:
            return None
        plan = self._plan()
        if plan.threads == self.plan.threads:
            return None
        self.plan = plan
        return self.apply()
