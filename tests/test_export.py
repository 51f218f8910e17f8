"""segkit-export: ONNX (and TorchScript) that match PyTorch at any batch and image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segkit.cli import export as export_cli
from segkit.config import build
from segkit.errors import ConfigError
from segkit.inference.export import compare, onnx_runner, onnx_session
from segkit.runs.checkpoint import save_checkpoint

from .conftest import CONF_DIR, TINY

pytest.importorskip("onnxruntime")


def compose_config(name, overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def checkpoint_for(model_option, path):
    cfg = compose_config("train", [*TINY, f"model={model_option}"])
    model = build(cfg.model, "model")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so parity is not checked on a near-constant net
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True)}, path)
    return path


def test_onnx_and_torchscript_match_pytorch_with_dynamic_shapes(tmp_path, capsys):
    checkpoint = checkpoint_for("unet", tmp_path / "best.pt")
    cfg = compose_config("export", [
        f"checkpoint={checkpoint}", "format=all", "benchmark_runs=2", "benchmark_warmup=1", "threads=1",
    ])
    result = export_cli.run(cfg)
    onnx_path = result["files"]["onnx"]
    assert onnx_path == tmp_path / "best.onnx" and (tmp_path / "best.torchscript.pt").is_file()
    for name in ("onnx", "torchscript"):
        checks = result["parity"][name]
        # onnx: + an image of another size through the training geometry (onnx_logits vs Predictor.logits)
        assert len(checks) == {"onnx": 3, "torchscript": 2}[name], [c.line(name) for c in checks]
        assert all(c.ok(1e-3) for c in checks), [c.line(name) for c in checks]
        assert checks[0].shape != checks[1].shape  # a second batch size and image size
    # A third shape, neither the traced one nor a multiple of the encoder stride.
    from segkit.inference.predictor import load

    model = load(checkpoint, "cpu").model.to(memory_format=torch.contiguous_format)
    parity = compare(model, onnx_runner(onnx_session(onnx_path)), (3, 3, 45, 71))
    assert parity.error is None and parity.max_abs_diff < 1e-3 and parity.argmax_agreement > 0.999
    table = capsys.readouterr().out
    assert "| onnxruntime (CPU EP) | 1x3x32x32 |" in table and "| PyTorch eager |" in table
    assert (tmp_path / "best.benchmark.md").read_text().strip().endswith(table.strip().splitlines()[-1])


def test_onnx_of_a_low_resolution_head_resizes_logits_at_any_size(tmp_path):
    checkpoint = checkpoint_for("fcn", tmp_path / "fcn.pt")  # logits at 1/32, resized inside the graph
    result = export_cli.run(compose_config("export", [f"checkpoint={checkpoint}", "benchmark=false"]))
    assert all(check.ok(1e-3) for check in result["parity"]["onnx"])
    images = np.random.rand(1, 3, 50, 37).astype(np.float32)
    logits = onnx_session(result["files"]["onnx"]).run(None, {"images": images})
    assert logits[0].shape == (1, 4, 50, 37)


def test_export_reports_a_wrong_format(tmp_path):
    cfg = compose_config("export", [f"checkpoint={tmp_path / 'x.pt'}", "format=tflite"])
    with pytest.raises(ConfigError, match="^format:"):
        export_cli.run(cfg)


def test_benchmark_can_be_switched_off(tmp_path):
    checkpoint = checkpoint_for("unet", tmp_path / "m.pt")
    output = tmp_path / "out" / "net"
    cfg = compose_config("export", [f"checkpoint={checkpoint}", "benchmark=false", f"output={output}"])
    result = export_cli.run(cfg)
    assert result["timings"] == [] and (tmp_path / "out" / "net.onnx").is_file()
    session = onnx_session(tmp_path / "out" / "net.onnx")
    logits = session.run(None, {"images": np.random.rand(2, 3, 20, 36).astype(np.float32)})[0]
    assert logits.shape == (2, 4, 20, 36)
