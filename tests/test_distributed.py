"""Several processes on CPU (gloo): the same training as one process with the global batch, exact
distributed validation, a killed rank, and the two supported launchers (torchrun, Hydra + submitit).

Every child process has a timeout and runs in its own session, killed as a group on failure, so a
hang can never stall the suite.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from segkit.config import validate_config
from segkit.data.loading import EpochSampler
from segkit.engine.distributed import DistContext, wrap_model
from segkit.engine.trainer import Trainer, fit
from segkit.errors import ConfigError
from segkit.runs.checkpoint import load_checkpoint

from .conftest import ROOT, TINY
from .faults.kill_campaign import pids_with_tag

# No BatchNorm (GroupNorm encoder, no decoder norm), CE (a per-pixel mean) and no augmentation: then
# 2 processes x batch 4 compute the same gradients as 1 process x batch 8, up to float rounding.
# (With BatchNorm the batch statistics differ unless trainer.sync_batchnorm=true, which needs CUDA.)
# Plain SGD, because its update is linear in the gradient: a rounding difference in the gradient stays a
# rounding difference in the weights. AdamW divides each update by sqrt(v): on near-zero gradients it turns
# rounding noise into steps of ~lr, which is why the old AdamW comparison passed on one CPU and failed on another.
EQUIVALENT = [
    "backbone.name=test_efficientnet_gn", "+model.options.decoder_use_norm=false", "loss=ce", "augmentation=none",
    "trainer.deterministic=true", "trainer.max_epochs=3", "trainer.val_batch_size=1", "dataset.val_size=7",
    "trainer.dist_timeout_s=60", "optimizer=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.0",
    "optimizer.weight_decay=0.0",
]
PER_PROCESS_BATCH, PROCESSES = ["trainer.batch_size=4"], 2
# The same global batch through accumulation: DDP skips the all-reduce (no_sync) on the first micro-batch.
PER_PROCESS_ACCUMULATED = ["trainer.batch_size=2", "trainer.accumulate_grad_batches=2"]
GLOBAL_BATCH = ["trainer.batch_size=8"]
# What float32 allows. Each gradient entry is a sum over the batch's 8 x 32 x 32 = 8192 pixel terms; the
# all-reduce (and micro-batching) adds the same terms in another order. Randomly behaving rounding gives an
# error of about sqrt(n) * u * sum(|terms|) (u = 2**-24 ~ 6e-8): ~5e-6 of sum(|terms|) for n = 8192. That is
# relative to sum(|terms|), not to |sum(terms)|: where terms cancel (small layers such as the SE blocks,
# where sum(|terms|) reaches ~100x the result) the relative error grows by that factor, and 6 SGD steps add
# 6 such errors into the displacement -lr * sum(g): 6 * 5e-6 * 100 = 3e-3. So each tensor's displacement
# from its initial value (a norm; single entries that cancel to ~0 have no relative bound) must agree to
# DISPLACEMENT_RTOL = 5e-3, whichever CPU's kernels (AVX-512 or not) order the sums. Seen on an AMD EPYC:
# 1e-4 at worst. A wrong gradient is far outside it: a missing all-reduce uses half the batch, a misplaced
# no_sync drops or doubles a micro-batch, each O(10%) of the displacement.
# Losses and metrics are single sums over all pixels without that cancellation: RTOL 1e-4.
RTOL, ATOL, DISPLACEMENT_RTOL = 1e-4, 1e-5, 5e-3


def child_env(tag: str = "") -> dict[str, str]:
    # One thread like this process (conftest); the tag finds the ranks in /proc to kill one.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "SEGKIT_TEST_TAG": tag}


def run_group(cmd: list[str], timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run in a new session; on timeout the whole group (launcher and every rank) is killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} did not end within {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def torchrun(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
            str(ROOT / "train.py"), *TINY, *overrides]


def assert_close(a: float, b: float) -> None:
    assert math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL), (a, b)


def assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                         start: dict[str, torch.Tensor]) -> None:
    """The weights moved from `start` by the same displacement, to float32 summation-order accuracy."""
    assert a.keys() == b.keys() == start.keys()
    moved = 0
    for key in a:
        if not start[key].is_floating_point():
            assert torch.equal(a[key], b[key]), key
            continue
        step_a, step_b = (a[key] - start[key]).double(), (b[key] - start[key]).double()
        size = step_b.norm().item()
        moved += size > 0
        assert (step_a - step_b).norm().item() <= DISPLACEMENT_RTOL * size + 1e-9, (key, size)
    assert moved > 0  # a comparison of weights that never moved would prove nothing


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process with the global batch."""
    from hydra import compose, initialize_config_dir

    from .conftest import CONF_DIR

    out = tmp_path_factory.mktemp("one_process")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, *EQUIVALENT, *GLOBAL_BATCH])
    # The seeded initial weights, which every run of this config starts from: displacements are measured from them.
    validate_config(cfg)
    trainer = Trainer(cfg, out)
    torch.save({k: v.clone() for k, v in trainer.parts.model.state_dict().items()}, out / "initial_weights.pt")
    trainer.fit()
    return out


def initial_weights(one_process: Path) -> dict[str, torch.Tensor]:
    return torch.load(one_process / "initial_weights.pt", weights_only=True)


# ---------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_training_shards_form_the_single_process_batches(world_size):
    length, batch, epoch = 23, 2, 5
    single = EpochSampler(length, shuffle=True, seed=7)
    single.set_epoch(epoch)
    order = list(single)
    shards = []
    for rank in range(world_size):
        sampler = EpochSampler(length, shuffle=True, seed=7, rank=rank, world_size=world_size, even=True)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1]) == length // world_size  # same step count on every rank
    steps = len(shards[0]) // batch
    for step in range(steps):  # one step on all ranks = the single process's batch of batch * world_size
        together = [i for shard in shards for i in shard[step * batch : (step + 1) * batch]]
        global_batch = batch * world_size
        assert sorted(together) == sorted(order[step * global_batch : (step + 1) * global_batch])


def test_resume_with_another_world_size_continues_from_the_global_offset():
    length, seed = 20, 3
    seen_by_two = []
    for rank in range(2):
        sampler = EpochSampler(length, shuffle=True, seed=seed, rank=rank, world_size=2, even=True)
        seen_by_two += list(sampler)[:3]  # 3 batches of 1 per rank: global offset 6
    rest = EpochSampler(length, shuffle=True, seed=seed, rank=0, world_size=1, even=True)
    rest.set_epoch(0, start=6)
    assert sorted(seen_by_two + list(rest)) == list(range(length))  # every sample once in the epoch


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_validation_shards_count_every_sample_exactly_once(world_size):
    length = 7
    shards = [list(EpochSampler(length, shuffle=False, seed=0, rank=r, world_size=world_size))
              for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(EpochSampler(length, shuffle=False, seed=0, rank=r, world_size=world_size))
            for r in range(world_size)] == [len(s) for s in shards]


def test_sync_batchnorm_on_cpu_is_refused_naming_the_key():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm"):
        wrap_model(model, DistContext(rank=0, world_size=2), torch.device("cpu"), sync_batchnorm=True)


# ---------------------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_submitit_job_of_two_tasks_trains_like_one_process_with_the_global_batch(one_process, compose_cfg,
                                                                                  tmp_path):
    """Hydra multirun through hydra/launcher=submitit_local with 2 tasks: one DDP job of 2 processes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    result = run_group(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
         "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=4", f"hydra.sweep.dir={sweep_dir}",
         *TINY, *EQUIVALENT, *PER_PROCESS_BATCH],
        timeout=240, env=child_env(),
    )
    job = sweep_dir / "0"
    assert result.returncode == 0 and (job / "metrics.json").is_file(), result.stdout[-3000:]
    assert "distributed: 2 processes (gloo)" in (job / "train.log").read_text()

    two, one = json.loads((job / "metrics.json").read_text()), json.loads((one_process / "metrics.json").read_text())
    assert two["steps"] == one["steps"] == 3 * 16 // 8
    two_history = load_checkpoint(job / "checkpoints/last.pt")["history"]
    one_history = load_checkpoint(one_process / "checkpoints/last.pt")["history"]
    for a, b in zip(two_history, one_history, strict=True):  # the loss trajectory, epoch by epoch
        assert_close(a["train/loss"], b["train/loss"])
    for key in ("miou", "mdice", "pixel_acc"):
        assert_close(two["final"][key], one["final"][key])
    assert_same_training(load_checkpoint(job / "checkpoints/last.pt")["model"],
                         load_checkpoint(one_process / "checkpoints/last.pt")["model"], initial_weights(one_process))
    # Rank 0 alone writes the run record: one row per epoch.
    assert len((job / "epochs.csv").read_text().strip().splitlines()) == 1 + 3

    # Distributed validation (7 images over 2 processes) = one process validating the same weights.
    single = Trainer(compose_cfg([*EQUIVALENT, *GLOBAL_BATCH, f"trainer.resume={job / 'checkpoints/last.pt'}"]),
                     tmp_path / "validate").validate()
    assert sum(map(sum, single["confusion_matrix"])) == 7 * 32 * 32
    assert {k: v for k, v in single.items() if k != "confusion_matrix"} == two["final"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
def test_killed_rank_ends_the_job_and_one_process_resumes_it(one_process, compose_cfg, tmp_path, caplog):
    """torchrun, 2 processes x batch 2 x 2 accumulated batches; rank 1 is killed; 1 process x batch 8 resumes
    and ends with the weights of the uninterrupted 1 x 8 run (wrong no_sync placement would break this)."""
    run_dir, tag = tmp_path / "run", f"segkit-{uuid.uuid4().hex}"
    proc = subprocess.Popen(torchrun(*EQUIVALENT, *PER_PROCESS_ACCUMULATED, f"hydra.run.dir={run_dir}"), cwd=ROOT,
                            env=child_env(tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        last = run_dir / "checkpoints" / "last.pt"
        deadline = time.time() + 180
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        victims = pids_with_tag(tag, rank=1)
        assert last.exists() and victims, "no checkpoint or no rank 1 to kill"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        started = time.time()
        out, _ = proc.communicate(timeout=120)  # torchrun stops the other rank; nothing waits for a timeout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "FAILED" in out and "SIGKILL" in out and "rank      : 1" in out, out[-3000:]
    assert time.time() - started < 60

    # Resume with 1 process x batch 8 (the same global batch): it ends where the uninterrupted run does.
    # The epochs the 2 processes trained already match the reference's loss trajectory.
    reference = load_checkpoint(one_process / "checkpoints/last.pt")
    for a, b in zip(load_checkpoint(last)["history"], reference["history"], strict=False):
        assert_close(a["train/loss"], b["train/loss"])
    progress = load_checkpoint(last)["progress"]
    assert 0 < progress["global_step"] < 6
    caplog.set_level(logging.INFO, logger="segkit")
    summary = fit(compose_cfg([*EQUIVALENT, *GLOBAL_BATCH, "trainer.resume=auto"]), run_dir)
    assert f"at epoch {progress['epoch']}, step {progress['global_step']}" in caplog.text
    assert summary["steps"] == 6
    assert_same_training(load_checkpoint(run_dir / "checkpoints/last.pt")["model"], reference["model"],
                         initial_weights(one_process))
