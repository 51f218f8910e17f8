"""A checkpoint or run directory from someone else is data: its config builds only allowlisted code.

Each gadget test also loads the same file with trust=True and sees the gadget go off: the check, not
an accident of the gadget, is what keeps the file from being written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import segkit
from segkit.cli import reproduce
from segkit.config import build
from segkit.engine.trainer import fit
from segkit.errors import CheckpointError, UntrustedConfigError
from segkit.models import build_model
from segkit.runs.checkpoint import load_checkpoint, save_checkpoint
from segkit.runs.trusted import check_run_config, checked_checkpoint_config

from .conftest import CONF_DIR, ROOT

SMP_AND_HEAD_MODELS = ["unet", "unetplusplus", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "segformer",
                       "upernet", "fcn", "lraspp"]
TORCHVISION_MODELS = sorted(p.stem for p in (CONF_DIR / "model" / "torchvision").glob("*.yaml"))


class WritesMarker:
    """Pickled into a second file: unpickling it creates `path` (what a torch.load gadget would run)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plain(cfg: DictConfig) -> dict[str, Any]:
    """A composed config as plain data to edit."""
    return cast(dict[str, Any], OmegaConf.to_container(cfg))


def stored_config(compose_cfg, overrides=()) -> dict:
    """The config as the trainer stores it in a checkpoint (resolved YAML), as plain data to edit."""
    stored = OmegaConf.create(OmegaConf.to_yaml(compose_cfg(overrides), resolve=True))
    assert isinstance(stored, DictConfig)
    return plain(stored)


def write_checkpoint(path: Path, config: dict, model_state: dict | None = None) -> Path:
    save_checkpoint({"model": model_state or {}, "config": OmegaConf.to_yaml(OmegaConf.create(config))}, path)
    return path


def gadgets(tmp_path: Path) -> dict[str, tuple[dict, Path, str]]:
    """name -> (model node, the file or directory it would create, the key the refusal must name)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("data")
    pickled = tmp_path / "innocent_weights.pt"
    torch.save(WritesMarker(tmp_path / "unpickled_marker"), pickled)
    nested_options = {"decoder_channels": [32, 16, 8, 4, 2], "extra": {"deep": [
        {"x": 1}, {"_target_": "shutil.copyfile", "src": str(secret), "dst": str(tmp_path / "nested_copy")}]}}
    return {
        "file_writing": ({"_target_": "shutil.copy", "src": str(secret), "dst": str(tmp_path / "copied")},
                         tmp_path / "copied", "model._target_"),
        "directory_creating": ({"_target_": "os.makedirs", "name": str(tmp_path / "made" / "dirs")},
                               tmp_path / "made", "model._target_"),
        "nested_in_options": ({"_target_": "segkit.models.build_model", "arch": "unet",
                               "backbone": {"name": "test_resnet"}, "num_classes": 3, "mean": [0, 0, 0],
                               "std": [1, 1, 1], "options": nested_options},
                              tmp_path / "nested_copy", "model.options.extra.deep[1]._target_"),
        "pickle_loading": ({"_target_": "torch.load", "f": str(pickled), "weights_only": False},
                           tmp_path / "unpickled_marker", "model._target_"),
    }


@pytest.mark.parametrize("gadget", ["file_writing", "directory_creating", "nested_in_options", "pickle_loading"])
def test_crafted_checkpoint_is_refused_and_writes_nothing(compose_cfg, tmp_path, gadget):
    model_node, created, key = gadgets(tmp_path)[gadget]
    config = stored_config(compose_cfg)
    config["model"] = model_node
    path = write_checkpoint(tmp_path / "shared.pt", config)

    with pytest.raises(UntrustedConfigError) as refused:
        segkit.load(path, device="cpu")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: {key}: ") and "trust=True" in message
    assert not created.exists()

    with pytest.raises(Exception):  # noqa: B017,PT011 - trusted, the gadget runs; loading then fails somewhere
        segkit.load(path, device="cpu", trust=True)
    assert created.exists()  # so the check above is what stopped it


def test_reproduce_trains_with_the_original_thread_count(compose_cfg, tmp_path, monkeypatch, caplog):
    """The float sums of a CPU run depend on its torch thread count, so a re-run pins the original's count
    when the original kept one throughout; it cannot when the count changed mid-run or the host has fewer cores."""
    import json

    from segkit.engine import reproduce as engine_reproduce

    cfg = compose_cfg()
    run_dir = run_dir_with(tmp_path, plain(cfg))
    fit(cfg, run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    threads = summary["torch_threads"]
    assert summary["torch_threads_by_step"] == [[0, threads]]

    def threads_of_a_rerun(shares, name: str, overrides=()) -> object:
        (run_dir / "metrics.json").write_text(json.dumps({**summary, "torch_threads_by_step": shares}))
        again = engine_reproduce.reproduce(run_dir, overrides, out=tmp_path / name)
        if shares == [[0, threads]]:
            assert again.differ == []  # the same count: the same sums, the same metrics
        return OmegaConf.load(again.run.config).trainer.threads

    assert threads_of_a_rerun([[0, threads]], "same") == threads
    other = threads + 1  # not what this host gives a lone training under the tests' OMP_NUM_THREADS=1
    monkeypatch.setattr("segkit.engine.threads.usable_cores", lambda: other)
    assert threads_of_a_rerun([[0, other]], "pinned") == other
    assert threads_of_a_rerun([[0, other]], "yours", ["trainer.threads=1"]) == 1
    with caplog.at_level("WARNING"):
        assert threads_of_a_rerun([[0, threads], [2, other]], "changed") is None
        assert threads_of_a_rerun([[0, other + 1]], "more_than_cores") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("changed during the run" in w for w in warnings)
    assert any(f"pass trainer.threads={other + 1}" in w for w in warnings)


@pytest.mark.parametrize(("change", "key"), [
    (lambda c: c["model"].update(_partial_=True), "model._partial_"),
    (lambda c: c["model"].update(_args_=["x"]), "model._args_"),
    (lambda c: c["model"].update(_recursive_=False), "model._recursive_"),
    (lambda c: c["model"].update(_convert_="none"), "model._convert_"),
    (lambda c: c["model"].update(options={"aux": "${oc.decode:'{_target_: os.makedirs, name: x}'}"}),
     "model.options.aux"),
    (lambda c: c["model"].update(options="${oc.create:{_target_: os.makedirs}}"), "model.options"),
    (lambda c: c["model"]["backbone"].update(name="hf-hub:someone/model"), "model.backbone.name"),
    (lambda c: c["model"].update(options={"checkpoint_path": "/elsewhere/file.pth"}),
     "model.options.checkpoint_path"),
    (lambda c: c["dataset"].update(_target_="shutil.rmtree", path="/elsewhere"), "dataset._target_"),
    (lambda c: c["dataset"].update(remap={"a": {"_target_": "os.makedirs"}}), "dataset.remap.a._target_"),
])
def test_hydra_keys_resolvers_and_file_reaching_arguments_are_refused(compose_cfg, tmp_path, change, key):
    config = stored_config(compose_cfg)
    change(config)
    path = write_checkpoint(tmp_path / "shared.pt", config)
    with pytest.raises(UntrustedConfigError, match=f"^{re.escape(f'{path}: {key}: ')}"):
        segkit.load(path, device="cpu")


def test_interpolations_resolve_before_the_check(compose_cfg, tmp_path):
    """A target hidden behind a reference to another section is found where it lands."""
    config = stored_config(compose_cfg)
    config["payload"] = {"_target_": "os.makedirs", "name": str(tmp_path / "made")}
    config["model"]["options"] = {"inner": "${payload}"}
    path = write_checkpoint(tmp_path / "shared.pt", config)
    with pytest.raises(UntrustedConfigError, match=r"model\.options\.inner\._target_: 'os\.makedirs'"):
        segkit.load(path, device="cpu")
    assert not (tmp_path / "made").exists()


@pytest.mark.parametrize("model", SMP_AND_HEAD_MODELS)
def test_every_model_segkit_trains_still_loads(compose_cfg, tmp_path, model):
    cfg = compose_cfg([f"model={model}", *(["backbone.name=pvt_v2_b0"] if model == "segformer" else [])])
    net = build(cfg.model, "model").eval()
    path = tmp_path / "best.pt"
    save_checkpoint({"model": net.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True)}, path)
    loaded = segkit.load(path, device="cpu")
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), net(images))


@pytest.mark.parametrize("model", TORCHVISION_MODELS)
def test_torchvision_model_configs_pass_the_check(compose_cfg, model):
    """Building these is too slow for a unit test; their stored configs pass the same check load runs."""
    cfg = OmegaConf.create(OmegaConf.to_yaml(compose_cfg([f"model=torchvision/{model}"]), resolve=True))
    assert isinstance(cfg, DictConfig)
    assert checked_checkpoint_config(cfg, "best.pt").model.arch == model


def tiny_model_of_my_own(**kwargs):
    """A user's own model builder: not on segkit's allowlist, loadable when the user trusts the file."""
    return build_model(**kwargs)


def test_trust_loads_a_model_built_by_the_users_own_code(compose_cfg, tmp_path):
    cfg = compose_cfg(["model=fpn", "model._target_=tests.test_trusted.tiny_model_of_my_own"])
    net = build(cfg.model, "model")
    path = tmp_path / "mine.pt"
    save_checkpoint({"model": net.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True)}, path)
    with pytest.raises(UntrustedConfigError, match="tests.test_trusted.tiny_model_of_my_own"):
        segkit.load(path, device="cpu")
    assert segkit.load(path, device="cpu", trust=True).num_classes == cfg.dataset.num_classes


def test_a_path_in_the_checkpoint_is_not_written_to(compose_cfg, tmp_path):
    config = stored_config(compose_cfg)
    config["dataset"]["cache_dir"] = str(tmp_path / "chosen_by_the_file")
    cfg = checked_checkpoint_config(OmegaConf.create(config), "shared.pt")
    assert cfg.dataset.cache_dir is None


def test_predict_refuses_in_one_line_and_names_the_flag(compose_cfg, tmp_path):
    model_node, created, _ = gadgets(tmp_path)["directory_creating"]
    config = stored_config(compose_cfg)
    config["model"] = model_node
    path = write_checkpoint(tmp_path / "shared.pt", config)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "photo.png")
    result = subprocess.run(
        [sys.executable, "-m", "segkit.cli.predict", f"checkpoint={path}", f"input={tmp_path / 'in'}",
         f"output={tmp_path / 'out'}"], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "trust_checkpoint=true" in lines[0]
    assert not created.exists()


def test_resume_takes_only_tensors_from_a_foreign_checkpoint(compose_cfg, tmp_path):
    """trainer.resume=<path>: the file's config and any path in it are never used; the run's own are."""
    fit(compose_cfg(["model=fpn"]), tmp_path / "theirs")
    state = load_checkpoint(tmp_path / "theirs" / "checkpoints" / "last.pt")
    state["config"] = OmegaConf.to_yaml({"model": {"_target_": "os.makedirs", "name": str(tmp_path / "made")},
                                         "output_root": str(tmp_path / "elsewhere")})
    state["output_dir"] = str(tmp_path / "elsewhere")
    crafted = tmp_path / "shared_last.pt"
    torch.save(state, crafted)
    summary = fit(compose_cfg(["model=fpn", "trainer.max_epochs=2", f"trainer.resume={crafted}"]), tmp_path / "mine")
    assert summary["epochs"] == 2 and (tmp_path / "mine" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "made").exists() and not (tmp_path / "elsewhere").exists()
    with pytest.raises(CheckpointError, match=r"shared_last\.pt: cannot resume from it, it does not fit this run"):
        fit(compose_cfg(["model=unet", f"trainer.resume={crafted}"]), tmp_path / "other")


# ---------------------------------------------------------------------- run directories (segkit-reproduce)
def run_dir_with(tmp_path: Path, config) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    return run_dir


@pytest.mark.parametrize("overrides", [
    ["model=unet"], ["model=fcn", "backbone.output_stride=8"], ["model=torchvision/lraspp_mobilenet_v3_large"],
    ["experiment=membrane_unet", "loss=focal", "optimizer=sgd", "scheduler=cosine"],
    ["experiment=camvid_deeplabv3plus", "augmentation=strong", "loss=lovasz", "scheduler=step"],
    ["augmentation=default", "loss=tversky", "logger=[console,mlflow,wandb,tensorboard]", "dataset=coco"],
])
def test_configs_segkit_composes_pass_the_run_check(compose_cfg, tmp_path, overrides):
    run_dir = run_dir_with(tmp_path, compose_cfg(overrides, tiny=False))  # as Hydra saves it: unresolved
    check_run_config(str(run_dir / ".hydra" / "config.yaml"))


def test_reproduce_refuses_a_crafted_run_and_writes_nothing(compose_cfg, tmp_path, capsys):
    config = plain(compose_cfg())
    config["model"] = {"_target_": "os.makedirs", "name": str(tmp_path / "made")}
    run_dir = run_dir_with(tmp_path, config)
    assert reproduce.main([str(run_dir), "--out", str(tmp_path / "again")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "model._target_: 'os.makedirs'" in error and "--trust" in error
    assert not (tmp_path / "made").exists() and not (tmp_path / "again").exists()


@pytest.mark.parametrize(("change", "key"), [
    (lambda c: c.update(hydra={"callbacks": {"x": {"_target_": "os.makedirs"}}}), "hydra"),
    (lambda c: c.update(defaults=["_self_"]), "defaults"),
    (lambda c: c["loss"].update(_target_="shutil.copy"), "loss._target_"),
    (lambda c: c["augmentation"]["transforms"].insert(0, {"_target_": "kornia.augmentation.torch.load"}),
     "augmentation.transforms[0]._target_"),
    (lambda c: c.update(output_root="/elsewhere/outputs"), "output_root"),
    (lambda c: c.update(logger={"tb": {"_target_": "segkit.trackers.tensorboard.TensorBoardTracker",
                                       "subdir": "../../../elsewhere"}}), "logger.tb.subdir"),
    (lambda c: c.update(logger={"ml": {"_target_": "segkit.trackers.mlflow.MLflowTracker",
                                       "tracking_uri": "http://their.server"}}), "logger.ml.tracking_uri"),
    (lambda c: c["dataset"].update(root="${oc.decode:'x'}"), "dataset.root"),
])
def test_run_check_refusals_name_the_key(compose_cfg, tmp_path, change, key):
    config = plain(compose_cfg())
    change(config)
    path = run_dir_with(tmp_path, config) / ".hydra" / "config.yaml"
    with pytest.raises(UntrustedConfigError, match=f"^{re.escape(f'{path}: {key}: ')}"):
        check_run_config(str(path))


def test_the_users_own_overrides_are_not_refused(compose_cfg, tmp_path):
    config = plain(compose_cfg())
    config["output_root"] = "/elsewhere/outputs"
    path = run_dir_with(tmp_path, config) / ".hydra" / "config.yaml"
    with pytest.raises(UntrustedConfigError, match="output_root"):
        check_run_config(str(path))
    check_run_config(str(path), [f"output_root={tmp_path / 'mine'}"])
    config["output_root"] = str(tmp_path)  # the run directory's own output_root: where its tracker store is
    check_run_config(str(run_dir_with(tmp_path / "again", config) / ".hydra" / "config.yaml"))


def test_report_reads_a_foreign_sweep_as_text(compose_cfg, tmp_path, monkeypatch):
    """segkit-report builds nothing from job directories and resolves no interpolation in them."""
    from segkit.cli.report import rows_from_sweep

    monkeypatch.setenv("SEGKIT_TEST_SECRET", "s3cret")
    config = plain(compose_cfg())
    config["model"] = {"_target_": "os.makedirs", "name": str(tmp_path / "made")}
    job = run_dir_with(tmp_path / "sweep", config)
    (job / ".hydra" / "overrides.yaml").write_text("- model=${oc.env:SEGKIT_TEST_SECRET}\n")
    (job / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n"
                                               "      model: ${oc.env:SEGKIT_TEST_SECRET}\n")
    (row,) = rows_from_sweep(tmp_path / "sweep")
    assert "s3cret" not in f"{row.overrides} {row.model}" and row.model == "${oc.env:SEGKIT_TEST_SECRET}"
    assert not (tmp_path / "made").exists()


def test_safetensors_export_loads_without_pickle_and_its_yaml_is_checked(compose_cfg, tmp_path):
    from hydra import compose, initialize_config_dir

    from segkit.cli import export as export_cli

    cfg = compose_cfg(["model=unet"])
    net = build(cfg.model, "model").eval()
    checkpoint = tmp_path / "best.pt"
    save_checkpoint({"model": net.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True)}, checkpoint)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        export_cfg = compose(config_name="export", overrides=[f"checkpoint={checkpoint}", "format=safetensors",
                                                               "benchmark=false"])
    files = export_cli.run(export_cfg)["files"]
    weights, config = tmp_path / "best.safetensors", tmp_path / "best.yaml"
    assert (files["safetensors"], files["config"]) == (weights, config)
    assert not weights.read_bytes().startswith(b"PK")  # not a zip of pickles: a JSON header and raw tensors

    loaded = segkit.load(weights, device="cpu")
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), net(images))

    stored = OmegaConf.load(config)
    stored.model = {"_target_": "os.makedirs", "name": str(tmp_path / "made")}
    config.write_text(OmegaConf.to_yaml(stored))
    with pytest.raises(UntrustedConfigError, match=r"best\.safetensors: model\._target_: 'os\.makedirs'"):
        segkit.load(weights, device="cpu")
    config.unlink()
    with pytest.raises(CheckpointError, match=r"best\.safetensors: cannot read its config best\.yaml"):
        segkit.load(weights, device="cpu")
    assert not (tmp_path / "made").exists()
