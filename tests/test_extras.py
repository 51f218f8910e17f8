"""Optional back ends are pip extras: selecting one that is not installed stops at start with one line naming it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from segkit.engine.trainer import fit
from segkit.errors import ConfigError
from segkit.extras import require_extra
from segkit.inference.export import export_onnx, onnx_session

from .conftest import ROOT, TINY


def test_train_with_a_logger_whose_extra_is_missing_prints_one_line_and_exits_2(tmp_path):
    # The interpreter starts with wandb unimportable (None in sys.modules), as if `pip install segkit` left it out.
    code = ("import runpy, sys; sys.modules['wandb'] = None; sys.argv = ['train.py', *sys.argv[1:]]; "
            "runpy.run_path('train.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, *TINY, "logger=wandb", f"hydra.run.dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == ["error: logger.wandb: needs the 'wandb' extra: pip install 'segkit[wandb]'"]
    assert not (tmp_path / "checkpoints").exists()  # stopped before training


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_a_tracker_without_its_extra_is_refused_before_any_data_is_read(compose_cfg, tmp_path, monkeypatch, logger):
    monkeypatch.setitem(sys.modules, logger, None)  # import <logger> now raises ModuleNotFoundError
    with pytest.raises(ConfigError) as caught:
        fit(compose_cfg([f"logger={logger}"]), tmp_path)
    assert str(caught.value) == f"logger.{logger}: needs the '{logger}' extra: pip install 'segkit[{logger}]'"
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("module", ["onnx", "onnxruntime"])
def test_onnx_export_without_the_extra_names_it_and_writes_nothing(tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    path = tmp_path / "model.onnx"
    with pytest.raises(ConfigError) as caught:
        if module == "onnx":
            export_onnx(torch.nn.Conv2d(3, 2, 1), path, (32, 32))
        else:
            onnx_session(path)
    assert str(caught.value) == "format: needs the 'onnx' extra: pip install 'segkit[onnx]'"
    assert not path.exists()


def test_an_installed_but_broken_extra_also_says_what_failed(tmp_path, monkeypatch):
    package = tmp_path / "brokenlib"
    package.mkdir()
    (package / "__init__.py").write_text("import missing_dependency_of_brokenlib\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        require_extra("logger.broken", "broken", "brokenlib")
    assert str(caught.value) == ("logger.broken: needs the 'broken' extra: pip install 'segkit[broken]' (brokenlib "
                                 "failed to import: No module named 'missing_dependency_of_brokenlib')")
