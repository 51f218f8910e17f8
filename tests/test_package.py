"""segkit as an installed package: the wheel carries its configs, every command runs from any directory,
and a user's own config directory (./conf, --config-dir) layers over segkit's tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose
from hydra.errors import ConfigCompositionException

from segkit.cli import init_config
from segkit.cli.common import CONFIG_DIR, app_help, config_loader, group_options, split_config_dir

from .conftest import ROOT, TINY, write_folder_dataset

# What the wheel is built from (pyproject.toml: packages segkit* and hydra_plugins*, README as the description).
SOURCES = ("pyproject.toml", "README.md", "segkit", "hydra_plugins")
# TINY with one optimizer step per epoch: 4 training images in batches of 4.
ONE_STEP = [o for o in TINY if not o.startswith(("dataset.train_size", "dataset.val_size"))] + [
    "dataset.train_size=4", "dataset.val_size=4"]
COMMANDS = ("train", "evaluate", "predict", "export", "calibrate", "check-data", "report", "reproduce", "split",
            "init-config")


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_the_wheel_carries_its_configs_and_trains_from_an_empty_directory(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing (build/, *.egg-info) in the checkout
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), "."], source)
    (wheel,) = (tmp_path / "dist").glob("segkit-*.whl")
    site = tmp_path / "site"
    run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)], tmp_path)
    assert (site / "segkit" / "conf" / "train.yaml").is_file() and (site / "segkit" / "conf" / "dataset").is_dir()

    empty = tmp_path / "work"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    probe = ("import importlib.metadata as m, json, segkit, hydra_plugins.segkit_conf as p; "
             "print(json.dumps([segkit.__file__, p.__file__, segkit.__version__, m.version('segkit')]))")
    segkit_file, plugin_file, version, metadata_version = json.loads(
        run([sys.executable, "-c", probe], empty, env).stdout)
    assert Path(segkit_file).is_relative_to(site) and Path(plugin_file).is_relative_to(site)  # not the checkout's
    assert version == metadata_version == wheel.name.split("-")[1]  # one version string

    for command in COMMANDS:  # each console script of the wheel answers from a directory with no conf/ in it
        assert run([str(site / "bin" / f"segkit-{command}"), "--help"], empty, env).stdout.strip(), command
    assert "dataset: " in run([str(site / "bin" / "segkit-train"), "--help"], empty, env).stdout

    run([str(site / "bin" / "segkit-train"), *ONE_STEP], empty, env)
    (metrics,) = (empty / "outputs" / "train" / "runs").glob("*/metrics.json")
    summary = json.loads(metrics.read_text())
    assert summary["steps"] == 1 and summary["status"] == "FINISHED"
    assert sorted(path.name for path in empty.iterdir()) == ["outputs"]  # nothing written outside the run root


def write_user_conf(directory: Path, max_epochs: int) -> Path:
    """A user's config tree: a new data set, an experiment using it, and segkit's trainer=default replaced."""
    (directory / "dataset").mkdir(parents=True)
    (directory / "experiment").mkdir()
    (directory / "trainer").mkdir()
    (directory / "dataset" / "mydata.yaml").write_text(
        "defaults:\n  - synthetic\n  - _self_\n\nname: mydata\nnum_classes: 5\n")
    (directory / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /dataset: mydata\n\ntask_name: mine\n")
    (directory / "trainer" / "default.yaml").write_text(f"max_epochs: {max_epochs}\n")
    return directory


def compose_train(overrides: list[str], config_dir: str | None = None, tiny: bool = True):
    with config_loader("train", config_dir):
        return compose("train", overrides=[*(TINY if tiny else []), *overrides])


def test_a_user_conf_adds_options_and_replaces_one_of_segkits(tmp_path, monkeypatch):
    assert compose_train([]).trainer.max_epochs == 1  # TINY's, from segkit's tree alone
    with pytest.raises(ConfigCompositionException, match="mydata"):
        compose_train(["dataset=mydata"])
    write_user_conf(tmp_path / "conf", max_epochs=7)
    monkeypatch.chdir(tmp_path)

    cfg = compose_train(["dataset=mydata"])
    assert (cfg.dataset.name, cfg.dataset.num_classes) == ("mydata", 5)
    assert cfg.dataset._target_ == "segkit.data.readers.synthetic.SyntheticShapes"  # segkit's option underneath
    plain = compose_train([], tiny=False)  # trainer=default is the user's file now
    assert plain.trainer.max_epochs == 7 and plain.trainer.batch_size == 8  # the rest: TrainerConfig's defaults
    assert compose_train(["experiment=mine"]).task_name == "mine"
    assert {"mydata", "synthetic", "camvid"} <= set(group_options("dataset"))
    groups = dict(line.split(": ", 1) for line in app_help("train", [], "train").split("== Config ==")[0]
                  .splitlines() if ": " in line)
    assert "mydata" in groups["dataset"].split(", ") and "mine" in groups["experiment"].split(", ")


def test_config_dir_comes_before_the_working_directorys_conf(tmp_path, monkeypatch):
    write_user_conf(tmp_path / "conf", max_epochs=7)
    other = write_user_conf(tmp_path / "elsewhere", max_epochs=3)
    (other / "dataset" / "mydata.yaml").unlink()
    (other / "dataset" / "theirs.yaml").write_text("defaults:\n  - synthetic\n  - _self_\n\nname: theirs\n")
    monkeypatch.chdir(tmp_path)
    with config_loader("train", str(other)):
        cfg = compose("train", overrides=["dataset=theirs"])
    assert cfg.trainer.max_epochs == 3 and cfg.dataset.name == "theirs"
    assert compose_train(["dataset=mydata"], str(other)).dataset.name == "mydata"  # ./conf still searched
    assert "theirs" in app_help("train", [], "train", str(other)).split("== Config ==")[0]


def test_help_takes_hydras_config_dir_flag_in_each_spelling():
    for args in (["--config-dir", "d", "a=1"], ["--config-dir=d", "a=1"], ["-cd", "d", "a=1"]):
        assert split_config_dir(args) == (["a=1"], "d")
    assert split_config_dir(["a=1", "--help"]) == (["a=1", "--help"], None)


def test_train_from_a_users_directory_reads_its_conf(tmp_path):
    """The real entry point (hydra_main): `python train.py` run where the user's conf/ is."""
    write_user_conf(tmp_path / "conf", max_epochs=7)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = run([sys.executable, str(ROOT / "train.py"), "--cfg", "job", "experiment=mine"], tmp_path, env).stdout
    assert "task_name: mine" in job and "name: mydata" in job and "max_epochs: 7" in job
    help_text = run([sys.executable, str(ROOT / "train.py"), "--help"], tmp_path, env).stdout
    assert "mydata" in help_text.split("== Config ==")[0]


def test_init_config_writes_into_the_users_conf_not_the_package(tmp_path, monkeypatch, capsys):
    assert not Path(init_config.parse_args(["data"]).out).is_absolute()  # relative: where the command runs
    root = write_folder_dataset(tmp_path / "shapes", count=4)
    monkeypatch.chdir(tmp_path)
    target = init_config.run(init_config.parse_args([str(root)]))
    assert target.resolve() == tmp_path / "conf" / "dataset" / "shapes.yaml"
    assert not (Path(CONFIG_DIR) / "dataset" / "shapes.yaml").exists()
    assert "wrote conf/dataset/shapes.yaml" in capsys.readouterr().out
    assert compose_train(["dataset=shapes"], tiny=False).dataset.root == str(root.resolve())  # usable as dataset=shapes
