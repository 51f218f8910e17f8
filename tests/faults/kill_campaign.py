"""Kill a 2-process torchrun training (CPU, gloo) the hard way and restart it at once with trainer.resume=auto.

Each kill is a SIGKILL of the launcher's whole process group (what a scheduler, the OOM killer or a
closed terminal does) or of one rank, at a random moment after the launch's first checkpoint, inside
validation or inside a checkpoint write (tests/faults/hooked_train.py marks those). The same command
is started again at once, without waiting for anything; the last launch runs to the end and its weights
must equal, bit for bit, those of an uninterrupted 2-process run.

The test suite runs a small campaign (tests/faults/test_kill_campaign.py); a larger one:

    PYTHONPATH=. .venv/bin/python -m tests.faults.kill_campaign --random 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from segkit.runs.checkpoint import load_checkpoint

from ..conftest import ROOT, TINY

PROCESSES = 2
# 2 optimizer steps per epoch (16 images, 2 x 4 per step), augmentation on: every rank's random state
# must come back exactly. One thread per process, as in every run compared.
SETTINGS = [*TINY, "trainer.deterministic=true", "augmentation=default", "trainer.dist_timeout_s=60"]
HOOKED_TRAIN = Path(__file__).with_name("hooked_train.py")
LAUNCH_TIMEOUT_S = 180  # one launch, from start to its kill or its end
GONE_WITHIN_S = 10  # after a kill, every process of the killed launch has exited within this
PAUSE_S, INTRUDER_PAUSE_S = 2.0, 120.0  # at a marked moment; long enough for a second train.py to start


@dataclass(frozen=True)
class Kill:
    target: str  # "launcher": SIGKILL to the launcher's process group | "rank1": SIGKILL to rank 1 alone
    moment: str  # "random" (after the launch's first checkpoint) | "validation" | "checkpoint_write"
    delay_s: float = 0.0  # after the moment
    intrude: bool = False  # at a marked moment: check that a second train.py on the run directory is refused


def random_kills(count: int, seed: int) -> list[Kill]:
    rng = random.Random(seed)
    return [Kill(rng.choice(["launcher", "launcher", "rank1"]), "random", round(rng.uniform(0.0, 1.5), 2))
            for _ in range(count)]


def command(run_dir: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
            str(HOOKED_TRAIN), *SETTINGS, f"trainer.max_epochs={epochs}", f"hydra.run.dir={run_dir}",
            "trainer.resume=auto"]


def environment(tag: str, marks: Path, pause_at: str | None, pause_s: float) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "SEGKIT_TEST_TAG": tag, "SEGKIT_MARKS": str(marks), "PYTHONPATH": str(ROOT)}
    env.pop("SEGKIT_PAUSE_AT", None)
    if pause_at:
        env.update(SEGKIT_PAUSE_AT=pause_at, SEGKIT_PAUSE_S=str(pause_s))
    return env


def launch(run_dir: Path, marks: Path, epochs: int, kill: Kill | None = None) -> tuple[subprocess.Popen, str]:
    """Start the run's command in a new session, pausing at the kill's moment if it is a marked one."""
    tag = f"segkit-kill-{uuid.uuid4().hex}"
    for old in marks.glob("*"):
        old.unlink()
    pause_at = kill.moment if kill is not None and kill.moment != "random" else None
    env = environment(tag, marks, pause_at, INTRUDER_PAUSE_S if kill is not None and kill.intrude else PAUSE_S)
    proc = subprocess.Popen(command(run_dir, epochs), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, tag


def pids_with_tag(tag: str, rank: int | None = None) -> list[int]:
    """Processes of one launch (their environment holds its tag), optionally only those of one rank."""
    wanted = [f"SEGKIT_TEST_TAG={tag}".encode()] + ([f"RANK={rank}".encode()] if rank is not None else [])
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(item in env for item in wanted):
            pids.append(int(entry.name))
    return pids


def wait_for_moment(proc: subprocess.Popen, run_dir: Path, marks: Path, kill: Kill) -> None:
    last = run_dir / "checkpoints" / "last.pt"
    seen = last.stat().st_mtime_ns if last.exists() else None

    def reached() -> bool:
        if kill.moment == "random":
            return last.exists() and last.stat().st_mtime_ns != seen
        return (marks / f"{kill.moment}.0").exists()

    deadline = time.time() + LAUNCH_TIMEOUT_S
    while not reached():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{kill}: the launch ended or stalled before the moment "
                               f"(exit {proc.returncode}):\n{_tail(proc)}")
        time.sleep(0.01)


def intrude(run_dir: Path, tag: str) -> dict[str, Any]:
    """A plain `train.py` aimed at the live run's directory: refused at once, naming rank 0's pid."""
    started = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *SETTINGS, f"hydra.run.dir={run_dir}",
                             "trainer.resume=auto"], cwd=ROOT, capture_output=True, text=True, timeout=110,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    owner = pids_with_tag(tag, rank=0)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return {"exit": result.returncode, "errors": errors or [result.stderr.strip()[-2000:]], "owner_pids": owner,
            "seconds": round(time.time() - started, 1)}


def strike(proc: subprocess.Popen, tag: str, kill: Kill) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"{kill}: the launch ended before the kill (exit {proc.returncode}):\n{_tail(proc)}")
    if kill.target == "launcher":
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group; torchrun's workers sit in their own sessions
        return
    for pid in pids_with_tag(tag, rank=1):
        os.kill(pid, signal.SIGKILL)


def collect(proc: subprocess.Popen, tag: str, killed_at: float) -> dict[str, Any]:
    """Output of a killed launch. The pipe closes when its last process (launcher or worker) has exited."""
    try:
        out, _ = proc.communicate(timeout=GONE_WITHIN_S)
        gone_after = time.time() - killed_at
    except subprocess.TimeoutExpired:
        survivors = pids_with_tag(tag)
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return {"workers_gone_s": None, "survivors": survivors, "output": out[-3000:]}
    lines = [line for line in out.splitlines() if "is gone, exiting" in line or line.startswith("error:")]
    return {"workers_gone_s": round(gone_after, 2), "survivors": pids_with_tag(tag), "lines": lines,
            "output": out[-3000:]}


def run_campaign(run_dir: Path, kills: list[Kill], marks: Path, epochs: int) -> dict[str, Any]:
    """Kill and restart as planned, then run to the end. Returns what happened at each kill and the final run."""
    marks.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    pending = None
    for kill in kills:
        proc, tag = launch(run_dir, marks, epochs, kill)
        if pending is not None:  # the previous launch's output, collected after the restart was issued
            records[-1].update(collect(*pending))
        wait_for_moment(proc, run_dir, marks, kill)
        record: dict[str, Any] = {"kill": asdict(kill)}
        if kill.intrude:
            record["intruder"] = intrude(run_dir, tag)
        time.sleep(kill.delay_s)
        strike(proc, tag, kill)
        pending = (proc, tag, time.time())
        records.append(record)
    proc, tag = launch(run_dir, marks, epochs)
    if pending is not None:
        records[-1].update(collect(*pending))
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return {"kills": records, "final": {"exit": proc.returncode, "output": out[-3000:]}}


def uninterrupted(run_dir: Path, marks: Path, epochs: int) -> subprocess.CompletedProcess:
    marks.mkdir(parents=True, exist_ok=True)
    proc, _ = launch(run_dir, marks, epochs)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def differing_weights(a: Path, b: Path) -> list[str]:
    """Names of the tensors of two checkpoints' models that are not equal bit for bit."""
    import torch

    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert first.keys() == second.keys()
    return [key for key in first if not torch.equal(first[key], second[key])]


def _tail(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        return ""
    out, _ = proc.communicate()
    return (out or "")[-3000:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=8, help="kills at random moments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--campaigns", type=int, default=1, help="independent runs, each killed --random times")
    args = parser.parse_args()
    epochs = 3 * args.random + 6  # each random kill comes after a new checkpoint and may let a few epochs pass
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.time()
        reference = uninterrupted(root / "reference", root / "marks", epochs)
        assert reference.returncode == 0, reference.stdout[-3000:]
        summary = []
        for index in range(args.campaigns):
            first, *rest = random_kills(args.random, args.seed + index)  # first: a checkpoint to fall back on
            kills = [first, Kill("launcher", "validation", 0.3), Kill("launcher", "checkpoint_write", 0.3), *rest]
            run_dir = root / f"killed_{index}"
            result = run_campaign(run_dir, kills, root / "marks", epochs)
            exact = result["final"]["exit"] == 0 and not differing_weights(
                root / "reference/checkpoints/last.pt", run_dir / "checkpoints/last.pt")
            summary.append({"seed": args.seed + index, "kills": len(kills), "final_exit": result["final"]["exit"],
                            "bit_exact": exact, "workers_gone_s": [k.get("workers_gone_s") for k in result["kills"]],
                            "survivors": [k["survivors"] for k in result["kills"] if k.get("survivors")]})
            print(json.dumps(summary[-1]), flush=True)
            if not exact:
                print(json.dumps(result, indent=1)[-6000:], flush=True)
        print(json.dumps({"campaigns": len(summary), "kills": sum(s["kills"] for s in summary),
                          "bit_exact": sum(s["bit_exact"] for s in summary),
                          "wall_s": round(time.time() - started, 1), "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
