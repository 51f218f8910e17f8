"""Commands answer at once: `--help`, `--cfg job` and a config error never wait for torch to load."""

from __future__ import annotations

import subprocess
import sys
import time

from segkit.cli.common import app_help

from .conftest import ROOT

TRAIN = [sys.executable, str(ROOT / "train.py")]
# (command, expected exit status, text its output must hold)
COMMANDS = {
    "train --help": ([*TRAIN, "--help"], 0, "== Configuration groups =="),
    "train --cfg job": ([*TRAIN, "--cfg", "job"], 0, "max_epochs: 10"),
    "train, a bad value": ([*TRAIN, "trainer.batch_size=0"], 2, "error: trainer.batch_size: must be > 0"),
    "train, an unknown key": ([*TRAIN, "trainer.no_such_key=1"], 1, "no_such_key"),
    **{f"segkit-{name.replace('_', '-')} --help": ([sys.executable, "-m", f"segkit.cli.{name}", "--help"], 0, "")
       for name in ("evaluate", "predict", "export", "calibrate", "check_data", "report", "reproduce", "split",
                    "init_config")},
}
IMPORT_TORCH = [sys.executable, "-c", "import torch"]


def _seconds(command: list[str], status: int, text: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert result.returncode == status, (command, result.stderr[-2000:])
    assert text in result.stdout + result.stderr, (command, result.stdout[-2000:], result.stderr[-2000:])
    return seconds


def test_commands_answer_before_torch_alone_would_have_loaded():
    """Each command's fastest of 3 runs against the fastest of 3 `python -c "import torch"`, interleaved so
    that load drift on a shared machine hits both alike. A ratio, not a time: it holds on any machine."""
    torch_runs: list[float] = []
    runs: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(3):
        torch_runs.append(_seconds(IMPORT_TORCH, 0, ""))
        for name, (command, status, text) in COMMANDS.items():
            runs[name].append(_seconds(command, status, text))
    baseline = min(torch_runs)
    slow = {name: f"{min(times):.2f} s" for name, times in runs.items() if min(times) >= baseline}
    assert not slow, f"slower than `import torch` ({baseline:.2f} s): {slow}"


def test_help_lists_the_groups_a_user_picks_and_hides_the_schema_nodes():
    text = app_help("train", ["model=fcn"], "train")
    groups = dict(line.split(": ", 1) for line in text.split("== Config ==")[0].splitlines() if ": " in line)
    assert {"augmentation", "backbone", "dataset", "experiment", "hparams_search", "logger", "loss", "model",
            "optimizer", "scheduler", "trainer"} <= set(groups)
    datasets = groups["dataset"].split(", ")
    assert {"camvid", "cityscapes", "coco", "folder", "synthetic", "voc"} <= set(datasets)
    assert datasets == sorted(path.stem for path in (ROOT / "segkit" / "conf" / "dataset").glob("*.yaml"))
    assert "torchvision/fcn_resnet50" in groups["model"].split(", ")  # picked as model=torchvision/fcn_resnet50
    assert "schema" not in text.split("== Config ==")[0] and "_base" not in groups["model"]
    assert "arch: fcn" in text  # the config as composed with the overrides
    check_data = app_help("check_data", [], "check")
    assert f"dataset: {groups['dataset']}\n" in check_data and "schema" not in check_data
    assert "== Configuration groups ==" not in app_help("evaluate", ["checkpoint=x.pt"], "evaluate")
