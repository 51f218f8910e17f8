"""Commands answer at once: `--help`, `--cfg job` and a config error never wait for torch to load."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from segkit.cli.common import app_help

from .conftest import ROOT

TRAIN = [sys.executable, str(ROOT / "train.py")]
HYDRA_HELP = "Hydra's own flags (-m multirun, --cfg job, --config-dir, ...): --hydra-help"
# What each `segkit-<name> --help` says: its description line, then its config keys (Hydra commands) or its
# usage line and options (argparse commands).
HELP = {
    "evaluate": ("`segkit-evaluate checkpoint=<run>/checkpoints/best.pt`: metrics, masks, pictures, report.",
                 "== Config ==", "\ncheckpoint: ???\n", "\nsplit: val\n", "\nscore_at:", "\ntta:", HYDRA_HELP),
    "predict": ("`segkit-predict checkpoint=best.pt input=<file|dir|glob> output=<dir>`: masks for new images.",
                "== Config ==", "\ncheckpoint: ???\n", "\ninput: ???\n", "\noutput: ???\n", "\nuncertainty:",
                HYDRA_HELP),
    "export": ("`segkit-export checkpoint=<run>/checkpoints/best.pt format=onnx`: export, check, benchmark.",
               "== Config ==", "\ncheckpoint: ???\n", "\nformat:", "\nopset:", "\nbenchmark:", HYDRA_HELP),
    "calibrate": ("`segkit-calibrate checkpoint=<run>/checkpoints/best.pt`: temperature scaling",
                  "== Config ==", "\ncheckpoint: ???\n", "\nsplit: val\n", "\nn_bins:", HYDRA_HELP),
    "check_data": ("`segkit-check-data <overrides>`: scan every split of a data set and report all problems at once.",
                   "== Configuration groups ==", "\ndataset: ", "synthetic", "== Config ==", "\n  num_classes:",
                   "\npreview:", HYDRA_HELP),
    "report": ("usage: segkit-report", "rank every run of a sweep", "sweep_dir", "--experiment", "--tracking-uri",
               "--out"),
    "reproduce": ("usage: segkit-reproduce", "train again from a run's saved", "run_dir", "overrides", "--out",
                  "--check", "--trust"),
    "split": ("usage: segkit-split", "write train/val(/test) split lists", "images", "--masks", "--ratios",
              "--folds", "--stratify", "--seed"),
    "init_config": ("usage: segkit-init-config", "look at a data set and write", "root", "--name", "--splits-dir",
                    "--val-ratio", "--force"),
}
# (command, expected exit status, texts its output must hold)
COMMANDS: dict[str, tuple[list[str], int, tuple[str, ...]]] = {
    "train --help": ([*TRAIN, "--help"], 0, ("== Configuration groups ==", "\nmodel: ", "\ntrainer:\n", HYDRA_HELP)),
    "train --cfg job": ([*TRAIN, "--cfg", "job"], 0, ("max_epochs: 10",)),
    "train, a bad value": ([*TRAIN, "trainer.batch_size=0"], 2, ("error: trainer.batch_size: must be > 0",)),
    "train, an unknown key": ([*TRAIN, "trainer.no_such_key=1"], 1, ("no_such_key",)),
    **{f"segkit-{name.replace('_', '-')} --help": ([sys.executable, "-m", f"segkit.cli.{name}", "--help"], 0, texts)
       for name, texts in HELP.items()},
}
IMPORT_TORCH = [sys.executable, "-c", "import torch"]


def _seconds(command: list[str], status: int, texts: tuple[str, ...]) -> float:
    start = time.perf_counter()
    env = {**os.environ, "COLUMNS": "80"}  # argparse wraps its help to the terminal's width
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    seconds = time.perf_counter() - start
    assert result.returncode == status, (command, result.stderr[-2000:])
    missing = [text for text in texts if text not in result.stdout + result.stderr]
    assert not missing, (command, missing, result.stdout[-2000:], result.stderr[-2000:])
    return seconds


@pytest.mark.slow
def test_commands_answer_before_torch_alone_would_have_loaded():
    """Each command's fastest of 3 runs against the fastest of 3 `python -c "import torch"`, interleaved so
    that load drift on a shared machine hits both alike. A ratio, not a time: it holds on any machine."""
    torch_runs: list[float] = []
    runs: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(3):
        torch_runs.append(_seconds(IMPORT_TORCH, 0, ()))
        for name, (command, status, texts) in COMMANDS.items():
            runs[name].append(_seconds(command, status, texts))
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
