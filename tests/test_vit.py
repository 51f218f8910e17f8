"""Plain ViT backbones (segkit/models/vit.py): every decoder on timm's tiny test ViTs at random init, the
simple pyramid, layer-wise lr decay, freezing, local weights, prediction geometry and ONNX parity."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf

import segkit
from segkit.config import build
from segkit.engine.optim import build_optimizer
from segkit.errors import ConfigError
from segkit.models import ARCHITECTURES
from segkit.models.vit import ViTPyramidEncoder, is_plain_vit
from segkit.runs.checkpoint import save_checkpoint

from .conftest import one_tensor

# timm's test ViTs: test_vit2 has a class token and a register token (patch 16, 8 blocks, width 64);
# eva02_tiny_patch14_224 is an Eva (EVA-02 / DINOv3 family: rotary embeddings) with patch 14.
VIT = "test_vit2"
PATCH14 = "eva02_tiny_patch14_224"
DECODERS = sorted(name for name, spec in ARCHITECTURES.items() if spec.family != "torchvision")


def vit_model(compose_cfg, arch: str, name: str = VIT, extra=()):
    return build(compose_cfg([f"model={arch}", f"backbone.name={name}", *extra]).model, "model")


def test_plain_vits_are_recognised_and_cnns_are_not():
    assert is_plain_vit("vit_small_patch14_reg4_dinov2.lvd142m") and is_plain_vit(PATCH14) and is_plain_vit(VIT)
    assert not is_plain_vit("resnet18") and not is_plain_vit("pvt_v2_b0") and not is_plain_vit("no_such_model")


@pytest.mark.parametrize("arch", DECODERS)
def test_every_decoder_runs_on_a_vit_at_odd_sizes_and_trains_the_blocks(compose_cfg, arch):
    model = vit_model(compose_cfg, arch).train()
    images = torch.rand(2, 3, 45, 71)  # neither a multiple of the patch nor of 32
    logits = model(images)
    assert logits.shape == (2, 4, 45, 71) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    first_block = model.encoder.blocks[0].attn.qkv.weight  # the Segmenter's encoder is the timm ViT itself
    assert first_block.grad is not None and first_block.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["unet", "upernet", "linear"])
def test_patch_14_and_rotary_embeddings_at_any_size(compose_cfg, arch):
    model = vit_model(compose_cfg, arch, PATCH14).eval()
    with torch.no_grad():
        for size in [(37, 53), (64, 96)]:
            assert model(torch.rand(1, 3, *size)).shape == (1, 4, *size)
    assert model.stride == (14 if arch == "linear" else 32)  # what the inference geometry pads to


def test_the_pyramid_has_smp_strides_and_takes_chosen_blocks():
    encoder = ViTPyramidEncoder(VIT, block_indices=[0, 0, 0, 0]).eval()
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        features = encoder(images)
        assert [f.shape[-2:] for f in features] == [(64 // s, 96 // s) for s in (1, 2, 4, 8, 16, 32)]
        assert features[1].shape[1] == 0  # no stride-2 map, as smp's transformer encoders
        cast(Any, encoder.model).blocks[-1].mlp.fc2.weight.mul_(3.0)  # the last block does not feed block 0's pyramid
        assert all(torch.equal(a, b) for a, b in zip(features, encoder(images), strict=True))
        last = ViTPyramidEncoder(VIT).eval()
        before = last(images)[-1]
        cast(Any, last.model).blocks[-1].mlp.fc2.weight.mul_(3.0)  # a timm ViT: typed as any nn.Module
        assert not torch.equal(before, last(images)[-1])


def test_dilated_deeplab_keeps_the_deep_levels_at_the_output_stride(compose_cfg):
    model = vit_model(compose_cfg, "deeplabv3", extra=["backbone.output_stride=16"]).eval()
    with torch.no_grad():
        features = model.net.encoder(torch.rand(1, 3, 64, 64))
    assert features[-1].shape[-1] == 64 // 16


@pytest.mark.parametrize(
    ("overrides", "key"),
    [(["model=unet", "backbone.block_indices=[0,1,2,3]"], "backbone.block_indices"),  # a CNN has no blocks
     (["model=dpt"], "backbone.name"), (["model=linear"], "backbone.name"),  # they need a ViT
     (["model=dpt", f"backbone.name={PATCH14}"], "backbone.name"),  # smp's DPT: patch 16 only
     (["model=unet", f"backbone.name={VIT}", "backbone.block_indices=[0,1,2]"], "backbone.block_indices")],
)
def test_what_does_not_fit_a_vit_names_the_key(compose_cfg, overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        build(compose_cfg(overrides).model, "model")


def test_layer_decay_gives_each_block_its_own_rate(compose_cfg):
    cfg = compose_cfg(["model=upernet", f"backbone.name={VIT}", "optimizer.layer_decay=0.5",
                       "optimizer.head_lr_mult=10"])
    model = build(cfg.model, "model")
    optimizer = build_optimizer(cfg.optimizer, model)
    lr = float(cfg.optimizer.lr)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(rate) == len(trainable) == sum(len(g["params"]) for g in optimizer.param_groups)  # each once
    blocks = len(model.encoder.blocks)
    for i, block in enumerate(model.encoder.blocks):
        assert rate[id(block.attn.qkv.weight)] == pytest.approx(lr * 0.5 ** (blocks - i))
    assert rate[id(model.encoder.patch_embed.proj.weight)] == pytest.approx(lr * 0.5 ** (blocks + 1))
    pyramid = model.net.encoder.levels[0][0].weight  # new layers learn at the head's rate
    assert rate[id(pyramid)] == pytest.approx(lr * 10)
    assert rate[id(next(model.net.decoder.parameters()))] == pytest.approx(lr * 10)


def test_layer_decay_on_a_cnn_names_the_key(compose_cfg):
    cfg = compose_cfg(["model=unet", "optimizer.layer_decay=0.8"])
    with pytest.raises(ConfigError, match=r"^optimizer.layer_decay: "):
        build_optimizer(cfg.optimizer, build(cfg.model, "model"))


def test_frozen_vit_trains_only_the_pyramid_and_decoder(compose_cfg):
    cfg = compose_cfg(["model=fpn", f"backbone.name={VIT}", "backbone.freeze=true"])
    model = build(cfg.model, "model").train()
    assert not any(p.requires_grad for p in model.encoder.parameters()) and not model.encoder.training
    assert all(p.requires_grad for p in model.net.encoder.levels.parameters())
    optimizer = build_optimizer(cfg.optimizer, model)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.encoder.parameters()}


def test_drop_path_and_activation_checkpointing_reach_the_blocks(compose_cfg):
    model = vit_model(compose_cfg, "unet", extra=["backbone.drop_path_rate=0.2"])
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.encoder.blocks]  # 0: an Identity
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)  # timm's linear rule
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing
    model.train()(torch.rand(1, 3, 32, 32)).mean().backward()


@pytest.mark.parametrize("layout", ["file", "hub_folder"])
def test_local_weights_load_offline_resampling_the_position_embeddings(compose_cfg, tmp_path, layout):
    from safetensors.torch import save_file

    source = timm.create_model(VIT, img_size=96)  # another grid than the model's default
    torch.nn.init.constant_(source.get_parameter("blocks.3.attn.qkv.weight"), 0.25)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if layout == "file":
        path = tmp_path / "vit.safetensors"
    else:  # a Hugging Face / timm hub folder: config.json + model.safetensors
        (tmp_path / "hub").mkdir()
        (tmp_path / "hub" / "config.json").write_text("{}")
        path = tmp_path / "hub" / "model.safetensors"
    save_file(state, str(path))
    weights = path if layout == "file" else path.parent
    model = vit_model(compose_cfg, "unet", extra=["backbone.pretrained=true", f"backbone.weights={weights}"])
    assert torch.all(model.encoder.blocks[3].attn.qkv.weight == 0.25)
    own_grid = timm.create_model(VIT).pos_embed.shape
    assert model.encoder.pos_embed.shape == own_grid != source.pos_embed.shape


def test_predict_returns_the_original_size_through_the_training_geometry(compose_cfg, tmp_path):
    cfg = compose_cfg(["model=segformer", f"backbone.name={VIT}", "dataset.image_size=[48,64]"])
    model = build(cfg.model, "model")
    path = tmp_path / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg, resolve=True)}, path)
    predictor = segkit.load(path, device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (37, 59, 3), dtype=np.uint8)
    mask = one_tensor(predictor.predict(image))
    assert mask.shape == (37, 59) and int(mask.max()) < 4
    assert torch.equal(one_tensor(predictor.predict(image)), mask)  # eval mode: drop path and dropout off


@pytest.mark.parametrize("arch", ["unet", "linear"])
def test_onnx_export_matches_pytorch_at_another_size(compose_cfg, tmp_path, arch):
    pytest.importorskip("onnxruntime")
    from segkit.inference.export import compare, example_size, export_onnx, onnx_runner, onnx_session

    model = vit_model(compose_cfg, arch).eval()
    path = export_onnx(model, tmp_path / f"{arch}.onnx", example_size(48, 64, model.stride))  # as segkit-export
    # Another batch and a size off the patch and stride grids: the position embeddings are interpolated in
    # the graph. Logits are O(1) sums of a few hundred float32 products per layer; 1e-3 is ~1000x float32
    # rounding through 8 blocks, far below a wrong interpolation (differences of order 0.1 and more).
    parity = compare(model, onnx_runner(onnx_session(path)), (2, 3, 45, 71))
    assert parity.error is None and parity.max_abs_diff < 1e-3
