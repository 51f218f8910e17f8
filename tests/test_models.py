"""Model assembly: pretrained weights offline, local weights files, freezing, any input size."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from omegaconf import OmegaConf

from segkit.config import build, validate_config
from segkit.engine.optim import build_optimizer
from segkit.errors import ConfigError


def test_pretrained_without_network_fails_with_a_clear_message(compose_cfg):
    cfg = compose_cfg(["model=fpn", "backbone.pretrained=true"])
    with pytest.raises(ConfigError, match=r"^backbone.pretrained: .*backbone.weights="):
        build(cfg.model, "model")


def test_pretrained_loads_a_local_timm_weights_file(compose_cfg, tmp_path):
    reference: Any = timm.create_model("test_resnet", pretrained=False)
    torch.nn.init.constant_(reference.conv1[0].weight, 0.123)
    path = tmp_path / "test_resnet.pth"
    torch.save(reference.state_dict(), path)
    cfg = compose_cfg(["model=fpn", "backbone.pretrained=true", f"backbone.weights={path}"])
    model = build(cfg.model, "model")
    stem = model.encoder.model.conv1[0].weight
    assert torch.all(stem == 0.123)


def test_weights_file_for_another_model_is_rejected(compose_cfg, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"unrelated.weight": torch.zeros(3)}, path)
    cfg = compose_cfg(["model=fpn", "backbone.pretrained=true", f"backbone.weights={path}"])
    with pytest.raises(ConfigError, match="no tensor matches"):
        build(cfg.model, "model")


def test_freeze_backbone_keeps_encoder_fixed(compose_cfg):
    cfg = compose_cfg(["model=deeplabv3plus", "backbone.freeze=true"])
    model = build(cfg.model, "model").train()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not model.encoder.training  # BatchNorm statistics frozen too
    optimizer = build_optimizer(cfg.optimizer, model)
    assert len(optimizer.param_groups) == 1  # only the head is optimised


@pytest.mark.parametrize("stride", [8, 16])
def test_output_stride_is_applied(compose_cfg, stride):
    cfg = compose_cfg(["model=deeplabv3", f"backbone.output_stride={stride}"])
    model = build(cfg.model, "model").eval()
    features = model.encoder(torch.rand(1, 3, 64, 64))
    assert features[-1].shape[-1] == 64 // stride


@pytest.mark.parametrize(
    ("experiment", "arch", "backbone"),
    [("camvid_scratch_unet", "unet", "resnet34"), ("camvid_cpu_unet", "unet", "resnet18"),
     ("membrane_unet", "unet", "resnet18")],
)
def test_results_recipes_compose_validate_and_build(compose_cfg, experiment, arch, backbone):
    cfg = compose_cfg([f"experiment={experiment}", "dataset.root=/data/x", "model.attention.decoder=se"], tiny=False)
    validate_config(cfg)
    assert (cfg.model.arch, cfg.backbone.name, cfg.backbone.pretrained) == (arch, backbone, False)
    assert cfg.task_name == experiment
    model = build(cfg.model, "model").eval()  # the recipe's model options are accepted by smp
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 96)).shape == (1, cfg.dataset.num_classes, 64, 96)


def test_every_model_config_composes_the_shared_keys_and_its_row_of_the_table(compose_cfg):
    """conf/model/*.yaml share _base_ (and _smp_); each composes exactly the keys the files spelled out
    before, in the same order, and ARCHITECTURES has one row per option, no more."""
    from segkit.cli.common import group_options
    from segkit.models import ARCHITECTURES

    options = group_options("model")
    assert sorted(option.rsplit("/", 1)[-1] for option in options) == sorted(ARCHITECTURES)
    shared = {"_target_": "segkit.models.build_model", "backbone": "${backbone}",
              "num_classes": "${dataset.num_classes}", "mean": "${dataset.mean}", "std": "${dataset.std}",
              "options": {}}
    attention = {"decoder": None, "skip_gates": False, "context": None}
    for option in options:
        node = OmegaConf.to_container(compose_cfg([f"model={option}"], tiny=False).model, resolve=False)
        arch = option.rsplit("/", 1)[-1]
        expected = {"_target_": shared["_target_"], "arch": arch, **{k: v for k, v in shared.items()
                                                                      if k != "_target_"}}
        if ARCHITECTURES[arch].attention:
            expected["attention"] = attention
        assert node == expected and list(node) == list(expected), option


@pytest.mark.parametrize("arch", ["fcn", "torchvision/fcn_resnet50"])
def test_architectures_without_attention_slots_refuse_attention(compose_cfg, arch):
    cfg = compose_cfg([f"model={arch}", "+model.attention.context=nonlocal"])
    with pytest.raises(ConfigError, match=r"^model.attention: attention blocks go into smp architectures"):
        build(cfg.model, "model")
