"""segkit.registry: every part a shipped config names is on the allowlist, and a user's own package adds
a loss (its module, its YAML, its entry point) without editing segkit, trusted only where it is installed."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segkit import registry
from segkit.cli.common import config_groups, config_loader, group_options
from segkit.config import validate_config
from segkit.errors import ConfigError, SegkitError, UntrustedConfigError
from segkit.runs.trusted import allowed_training_target, check_run_config

from .conftest import CONF_DIR, ROOT, TINY, write_folder_dataset

GROUPS = sorted(path.name for path in CONF_DIR.iterdir() if path.is_dir() and path.name != "hydra")


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "_target_"] + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def _composed_targets(group: str) -> dict[str, list[str]]:
    """option -> the `_target_`s of train.yaml composed with `group=option` (the run config Hydra saves)."""
    found, options = {}, group_options(group)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for option in options:
            cfg = compose(config_name="train", overrides=[f"{group}={option}"])
            found[option] = _targets(OmegaConf.to_container(cfg, resolve=False))
    return found


def test_every_group_of_the_config_tree_is_one_train_composes():
    with config_loader() as loader:
        assert set(GROUPS) <= set(config_groups(loader, "train"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_names_only_allowlisted_targets(group):
    refused = {option: [t for t in targets if not allowed_training_target(t)]
               for option, targets in _composed_targets(group).items()}
    assert not {option: targets for option, targets in refused.items() if targets}


def test_every_registered_part_of_segkit_is_named_by_a_shipped_config():
    """The other direction: no registration is left over from a part the config tree no longer offers."""
    named = {t for group in GROUPS for targets in _composed_targets(group).values() for t in targets}
    segkits = {target for target in registry.targets(*registry.KINDS) if target.startswith("segkit.")}
    assert segkits - named == set()


def test_loss_modes_are_the_classes_attributes(compose_cfg):
    for part in registry.parts("loss"):
        assert registry.loss_mode(part.target) == getattr(registry.load(part.target), "mode", None)
    cfg = compose_cfg(["loss=dice_bce"])  # binary terms on a multiclass model
    with pytest.raises(ConfigError, match="model.num_classes=1"):
        validate_config(cfg)
    assert registry.loss_mode("os.system") is None  # unregistered: never imported, no mode


def test_a_config_error_still_answers_before_torch_loads():
    """Loss modes live on the (torch) loss classes, so validate_config checks them last."""
    code = ("import sys; from hydra import compose, initialize_config_dir; "
            "from segkit.cli.common import CONFIG_DIR, register_configs; from segkit.config import validate_config; "
            "register_configs(); initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'); "
            "cfg = compose('train', overrides=['trainer.save_top_k=-1', 'loss=dice_bce'])\n"
            "try:\n    validate_config(cfg)\nexcept Exception as error:\n    print(error, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "trainer.save_top_k: must be >= 0, got -1 False", result.stderr[-2000:]


def test_registering_a_target_twice_differently_fails():
    registry.register("loss", "segkit.losses.CrossEntropy")  # a module imported again: the same part
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("tracker", "segkit.losses.CrossEntropy")


def test_a_broken_package_is_one_line_naming_its_entry_point(monkeypatch):
    from importlib.metadata import EntryPoint

    broken = EntryPoint(name="loss", value="no_such_module_of_segkit", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken])
    monkeypatch.setattr(registry, "_loaded", set())
    with pytest.raises(SegkitError, match="entry point loss = no_such_module_of_segkit .* failed to import"):
        registry.parts("loss")
    with pytest.raises(SegkitError):  # not marked loaded: asked again, it fails again
        registry.parts("loss")


def detect_marked(root: Path):
    """A user's format detector: its data sets hold a MARKER file."""
    from segkit.tools.layout import Layout

    return Layout("marked", "marked", root) if (root / "MARKER").is_file() else None


def test_a_registered_format_is_detected_before_the_generic_folders(tmp_path, monkeypatch):
    from segkit.config import DatasetConfig
    from segkit.tools.layout import detect_layout

    write_folder_dataset(tmp_path)
    assert detect_layout(tmp_path).kind == "folder"
    registry.parts("dataset")
    monkeypatch.setattr(registry, "_parts", dict(registry._parts))  # the registration ends with the test

    @registry.dataset_format("marked", detect="tests.test_registry.detect_marked")
    @dataclasses.dataclass
    class MarkedSchema(DatasetConfig):
        _target_: str = "tests.test_registry.MarkedReader"

    assert detect_layout(tmp_path).kind == "folder"
    (tmp_path / "MARKER").touch()
    assert detect_layout(tmp_path).kind == "marked"
    assert registry.dataset_formats()["marked"].schema is MarkedSchema


def _defaults_agree(function, schema: type) -> list[str]:
    """`function`'s keyword defaults that differ from the same key's default in `schema`; a field with a
    default factory (a mapping, a list) agrees with an empty default (None, ())."""
    fields = {field.name: field for field in dataclasses.fields(schema)}
    differ = []
    for param in inspect.signature(function).parameters.values():
        field = fields.get(param.name)
        if field is None or param.default is inspect.Parameter.empty:
            continue
        if field.default_factory is not dataclasses.MISSING:
            agree = not param.default and not field.default_factory()
        else:
            agree = param.default == field.default
        if not agree:
            differ.append(f"{param.name}: {param.default!r}")
    return differ


@pytest.mark.parametrize("name", sorted(registry.dataset_formats()))
def test_a_readers_defaults_are_its_schemas(name):
    part = registry.dataset_formats()[name]
    assert part.schema is not None, name  # a dataset format registers on its schema
    assert not _defaults_agree(registry.load(part.target).__init__, part.schema)


def test_the_base_readers_options_default_as_their_schema():
    from segkit.data.readers.base import SegmentationDataset
    from segkit.data.readers.schemas import DatasetOptions

    assert not _defaults_agree(SegmentationDataset.__init__, DatasetOptions)


USER_LOSS = '''
"""A user's loss, outside segkit: registered through the `segkit.parts` entry point of its package."""
import torch.nn.functional as F
from torch import nn

from segkit.registry import register


@register("loss")
class SoftBinaryCrossEntropy(nn.Module):
    mode = "binary"

    def __init__(self, ignore_index: int = 255, smoothing: float = 0.1) -> None:
        super().__init__()
        self.ignore_index, self.smoothing = ignore_index, smoothing

    def forward(self, logits, target):
        valid = target != self.ignore_index
        soft = (target == 1).float() * (1 - self.smoothing) + self.smoothing / 2
        return F.binary_cross_entropy_with_logits(logits[:, 0][valid], soft[valid])
'''


def _user_package(tmp_path: Path) -> tuple[Path, Path]:
    """site/ holds the installed package (its module, its dist-info with the entry point); project/conf the YAML."""
    site = tmp_path / "site"
    (site / "my_losses").mkdir(parents=True)
    (site / "my_losses" / "__init__.py").write_text(USER_LOSS)
    info = site / "my_losses-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-losses\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[segkit.parts]\nloss = my_losses\n")
    project = tmp_path / "project"
    (project / "conf" / "loss").mkdir(parents=True)
    (project / "conf" / "loss" / "soft_bce.yaml").write_text(
        "_target_: my_losses.SoftBinaryCrossEntropy\nignore_index: ${dataset.ignore_index}\nsmoothing: 0.05\n")
    return site, project


def test_a_users_package_adds_a_loss_trusted_only_where_it_is_installed(tmp_path):
    site, project = _user_package(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    train = [sys.executable, str(ROOT / "train.py"), "--config-dir", "conf", *TINY, "loss=soft_bce",
             "model.num_classes=1", "dataset.num_classes=2", "dataset.class_names=null",
             "trainer.save_checkpoints=false", "hydra.run.dir=outputs/run"]
    result = subprocess.run(train, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = project / "outputs" / "run" / ".hydra" / "config.yaml"
    assert OmegaConf.load(saved).loss._target_ == "my_losses.SoftBinaryCrossEntropy"

    # Where the package is installed, segkit-reproduce's check passes and the loss's mode is known.
    check = ("import sys; from segkit import registry; from segkit.runs.trusted import check_run_config; "
             f"check_run_config({str(saved)!r}); print(registry.loss_mode('my_losses.SoftBinaryCrossEntropy'))")
    result = subprocess.run([sys.executable, "-c", check], cwd=project, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "binary"

    # Here, without the package, the same run is a foreign file naming an unknown target: refused.
    with pytest.raises(UntrustedConfigError, match="loss._target_: 'my_losses.SoftBinaryCrossEntropy'"):
        check_run_config(str(saved))
    assert "my_losses" not in sys.modules
