"""Failures cost minutes, not the run: kills, signals, corrupt files, NaNs, full disks."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch

from segkit.engine.failures import OutOfMemory, TrainingDiverged
from segkit.engine.trainer import Trainer, fit
from segkit.errors import CheckpointError
from segkit.runs import checkpoint as checkpoint_module
from segkit.runs.checkpoint import load_checkpoint, save_checkpoint

from ..conftest import ROOT, TINY, write_folder_dataset

SLOW = ["trainer.max_epochs=5", "dataset.train_size=24", "trainer.deterministic=true", "augmentation=default"]


def cli(*overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *TINY, *overrides]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(compose_cfg, tmp_path):
    straight = fit(compose_cfg(SLOW), tmp_path / "straight")
    run_dir = tmp_path / "killed"
    # Same thread count as this process (conftest): CPU float reductions depend on it.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    last = run_dir / "checkpoints" / "last.pt"
    for delay in (0.05, 0.4):  # after a checkpoint appears: inside the next steps, validation or write
        seen = last.stat().st_mtime_ns if last.exists() else None
        proc = subprocess.Popen(cli(*SLOW, f"hydra.run.dir={run_dir}", "trainer.resume=auto"), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and (not last.exists() or last.stat().st_mtime_ns == seen):
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = subprocess.run(cli(*SLOW, f"hydra.run.dir={run_dir}", "trainer.resume=auto"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    b = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert b["progress"]["global_step"] == straight["steps"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert b["history"][-1]["val/miou"] == a["history"][-1]["val/miou"]


@pytest.mark.slow
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_a_resume_hint(tmp_path):
    proc = subprocess.Popen(cli("trainer.max_epochs=200", f"hydra.run.dir={tmp_path}"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "SIGTERM" in stderr and "trainer.resume=auto" in stderr
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert 0 < state["progress"]["global_step"] < 200 * 4


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(compose_cfg, tmp_path, caplog):
    fit(compose_cfg(["trainer.max_epochs=2"]), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(last)
    summary = fit(compose_cfg(["trainer.max_epochs=3", "trainer.resume=auto"]), tmp_path)
    assert "trying the previous checkpoint" in caplog.text
    assert summary["epochs"] == 3  # resumed from epoch 1 (last.prev.pt), then trained 2 more


def test_crash_inside_a_checkpoint_write_resumes_from_a_complete_one(compose_cfg, tmp_path, caplog):
    """The two windows of save_checkpoint: temp file half written, and last.pt renamed away."""
    fit(compose_cfg(["trainer.max_epochs=2"]), tmp_path)
    checkpoints = tmp_path / "checkpoints"
    stale = checkpoints / ".last.pt.tmp"
    stale.write_bytes((checkpoints / "last.pt").read_bytes()[:1000])  # killed mid-write, a while ago:
    os.utime(stale, (time.time() - 3600,) * 2)  # a temporary younger than a minute may be another writer's
    os.replace(checkpoints / "last.pt", checkpoints / "last.prev.pt")  # killed between the two renames
    caplog.set_level("INFO")
    summary = fit(compose_cfg(["trainer.max_epochs=3", "trainer.resume=auto"]), tmp_path)
    assert "last.prev.pt at epoch 2, step 8" in caplog.text  # continued, not restarted
    assert summary["epochs"] == 3 and summary["steps"] == 3 * 4
    assert not (checkpoints / ".last.pt.tmp").exists()  # the next save replaced the stale temp file


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": os.system}, path)  # noqa: S605 - never called, only pickled
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_full_disk_keeps_previous_checkpoint_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"last\.pt: cannot write checkpoint \(No space left on device\)"):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert not list(tmp_path.glob(".*.tmp"))


def test_nan_loss_skips_steps_and_stops_after_max_bad_steps(compose_cfg, tmp_path):
    cfg = compose_cfg(["loss=ce", "loss._target_=tests.faults.helpers.NaNLoss",
                       "+loss.start=4", "trainer.max_epochs=5", "trainer.max_bad_steps=3"])
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf for \d+ steps in a row up to step \d+.*last\.pt"):
        fit(cfg, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")  # written after the good first epoch
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_isolated_nan_step_is_skipped_without_touching_weights(compose_cfg, tmp_path):
    cfg = compose_cfg(["loss=ce", "loss._target_=tests.faults.helpers.NaNLoss",
                       "+loss.start=0", "trainer.max_steps=2", "trainer.max_bad_steps=100",
                       "trainer.save_checkpoints=true"])
    summary = fit(cfg, tmp_path)
    assert summary["bad_steps"] == 2
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("failing_call", "stage", "hint"),
    # epoch 0 = 4 training forwards + 2 validation forwards; call 5 validates, call 7 trains epoch 1
    [(5, "validation", "trainer.val_batch_size"), (7, "training", "trainer.accumulate_grad_batches")],
)
def test_out_of_memory_names_sizes_and_a_fix_and_keeps_the_checkpoint(compose_cfg, tmp_path, failing_call,
                                                                      stage, hint):
    trainer = Trainer(compose_cfg(["trainer.max_epochs=2"]), tmp_path)
    real_forward, calls = trainer.parts.step.forward, 0

    def forward(images: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
        return real_forward(images)

    trainer.parts.step.forward = forward
    with pytest.raises(OutOfMemory) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "\n" not in message and f"out of memory in {stage}" in message
    assert "batch size 4 at image size 32x32" in message and hint in message and "bf16-mixed" in message
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "FAILED"
    if stage == "training":  # the epoch-0 checkpoint written before the failure is intact
        assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["progress"]["global_step"] == 4


def test_validation_keeps_at_most_one_batch_of_outputs_alive(compose_cfg, tmp_path):
    """Memory bound: a validation set of any size holds one batch plus the confusion matrix."""
    trainer = Trainer(compose_cfg(["dataset.val_size=40"]), tmp_path)
    real_forward, most_alive = trainer.parts.step.forward, 0
    outputs: list[weakref.ref[torch.Tensor]] = []

    def forward(images: torch.Tensor) -> torch.Tensor:
        nonlocal most_alive
        gc.collect()
        most_alive = max(most_alive, sum(ref() is not None for ref in outputs))
        logits = real_forward(images)
        outputs.append(weakref.ref(logits))
        return logits

    trainer.parts.step.forward = forward
    trainer.validate()
    gc.collect()
    assert len(outputs) == 10
    assert most_alive <= 1  # only the previous batch's logits, about to be replaced
    assert all(ref() is None for ref in outputs)


def test_bad_image_in_a_dataloader_worker_is_one_line_naming_the_file(tmp_path):
    root = write_folder_dataset(tmp_path / "data", count=8)
    bad = root / "images" / "train" / "img_005.jpg"
    bad.write_bytes(b"not a jpeg at all")
    not_for_folder = ("dataset.train_size", "dataset.val_size", "trainer.num_workers")
    overrides = [o for o in TINY if not o.startswith(not_for_folder)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, "dataset=folder", f"dataset.root={root}",
         "dataset.num_classes=3", "trainer.num_workers=2", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and str(bad) in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
