"""The commands' entry configs on their schemas, and each default written in one place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from segkit.cli.common import CONFIG_DIR
from segkit.config import CalibrateConfig, EvaluateConfig, ExportConfig, PredictConfig, TrainerConfig

from .conftest import ROOT

SCHEMAS = {"evaluate": EvaluateConfig, "predict": PredictConfig, "export": ExportConfig, "calibrate": CalibrateConfig}
REQUIRED = {"checkpoint=x.pt", "input=a", "output=b"}  # the ??? keys a user always gives
# One integer key of each config, to give a value of the wrong type.
INTEGER_KEY = {"evaluate": "num_workers", "predict": "batch_size", "export": "opset", "calibrate": "n_bins"}


def compose_entry(name: str, overrides: list[str]):
    keys = OmegaConf.load(Path(CONFIG_DIR) / f"{name}.yaml").keys()
    required = [o for o in REQUIRED if o.split("=")[0] in keys]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=[*required, *overrides])


@pytest.mark.parametrize("name", SCHEMAS)
def test_entry_config_is_typed_by_its_schema_with_every_key_from_its_yaml(name):
    cfg = compose_entry(name, [])
    assert OmegaConf.get_type(cfg) is SCHEMAS[name]
    written = OmegaConf.load(Path(CONFIG_DIR) / f"{name}.yaml")
    keys = {key for key in written if key not in ("defaults", "hydra")}
    assert set(cfg) == keys  # the YAML gives every schema key its default, the schema types every YAML key
    assert not [key for key in cfg if OmegaConf.is_missing(cfg, key)]


@pytest.mark.parametrize("name", SCHEMAS)
def test_entry_config_refuses_an_unknown_key_or_a_wrong_type_naming_the_key(name, tmp_path, monkeypatch):
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_entry(name, ["no_such_key=1"])
    key = INTEGER_KEY[name]
    with pytest.raises(ConfigCompositionException, match=key):
        compose_entry(name, [f"{key}=many"])
    # A misspelt key in a config file (here a user's own copy of the entry config) fails at composition too.
    (tmp_path / "conf").mkdir()
    text = (Path(CONFIG_DIR) / f"{name}.yaml").read_text()
    (tmp_path / "conf" / f"{name}.yaml").write_text(f"{text}\nprogres_bar: false\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigCompositionException) as misspelt:
        compose_entry(name, [])
    assert "progres_bar" in f"{misspelt.value} {misspelt.value.__cause__}"


def test_a_wrong_type_stops_the_command_before_it_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "segkit.cli.evaluate", f"checkpoint={tmp_path / 'x.pt'}",
                             "tta=perhaps"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "tta" in result.stderr and "EvaluateConfig" in result.stderr
    assert not (tmp_path / "eval").exists()


def test_trainer_presets_hold_only_what_differs_from_trainer_config():
    """TrainerConfig (segkit/config.py) is where each trainer default is written; a preset repeating one
    would be a second copy to keep in step."""
    defaults = OmegaConf.structured(TrainerConfig)
    presets = sorted((Path(CONFIG_DIR) / "trainer").glob("*.yaml"))
    assert [path.stem for path in presets if path.stem == "default"]
    for path in presets:
        values = OmegaConf.load(path)
        assert isinstance(values, DictConfig), path
        repeated = [key for key in values if key != "defaults" and values[key] == defaults[key]]
        assert not repeated, f"{path.name} repeats TrainerConfig's defaults: {repeated}"
