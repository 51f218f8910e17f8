"""model.attention: SE / CBAM in decoder blocks, Attention U-Net skip gates, a non-local context block."""

from __future__ import annotations

import pytest
import torch
from timm.layers import NonLocalAttn, SEModule
from timm.layers.cbam import CbamModule

from segkit.config import build
from segkit.errors import ConfigError
from segkit.models.attention import AttentionGate

# option -> (overrides, inserted module type, how many the test_resnet U-Net gets)
OPTIONS = {
    "se": (["model.attention.decoder=se"], SEModule, 5),  # one per decoder block
    "cbam": (["model.attention.decoder=cbam"], CbamModule, 5),
    "skip_gates": (["model.attention.skip_gates=true"], AttentionGate, 4),  # the last block has no skip
    "nonlocal": (["model.attention.context=nonlocal"], NonLocalAttn, 1),
}


def build_unet(compose_cfg, overrides, seed=0):
    torch.manual_seed(seed)
    return build(compose_cfg(["model=unet", *overrides]).model, "model")


def inserted(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("option", OPTIONS)
def test_block_is_on_the_forward_path_and_trains(compose_cfg, option):
    overrides, kind, count = OPTIONS[option]
    model = build_unet(compose_cfg, overrides)
    blocks = inserted(model, kind)
    assert len(blocks) == count
    assert not inserted(build_unet(compose_cfg, []), kind)  # the plain model has none
    fired = []
    for block in blocks:
        block.register_forward_hook(lambda *_: fired.append(1))
    images = torch.rand(2, 3, 40, 50)  # not a multiple of the stride
    logits = model.train()(images)
    assert logits.shape == (2, 4, 40, 50) and len(fired) == count
    logits.logsumexp(1).mean().backward()
    for block in blocks:
        grads = [p.grad for p in block.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)  # the loss depends on the block's weights


@pytest.mark.parametrize("option", OPTIONS)
def test_changing_the_block_weights_changes_the_output(compose_cfg, option):
    overrides, kind, _ = OPTIONS[option]
    model = build_unet(compose_cfg, overrides).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(images)
        for block in inserted(model, kind):  # (the non-local block starts as identity: its BN scale is 0)
            for param in block.parameters():
                param.add_(torch.randn_like(param))
        after = model(images)
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("option", OPTIONS)
def test_state_dict_round_trip(compose_cfg, option):
    overrides, kind, count = OPTIONS[option]
    source = build_unet(compose_cfg, overrides, seed=0).eval()
    target = build_unet(compose_cfg, overrides, seed=1).eval()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(source(images), target(images))
        target.load_state_dict(source.state_dict())  # strict: every inserted key is saved and restored
        assert torch.equal(source(images), target(images))
    prefixes = [name for name, module in source.named_modules() if isinstance(module, kind)]
    keys = source.state_dict().keys()
    assert len(prefixes) == count and all(any(k.startswith(f"{p}.") for k in keys) for p in prefixes)


def test_options_combine_and_context_works_on_other_architectures(compose_cfg):
    everything = ["model.attention.decoder=cbam", "model.attention.skip_gates=true", "model.attention.context=nonlocal"]
    model = build_unet(compose_cfg, everything)
    assert [len(inserted(model, k)) for k in (CbamModule, AttentionGate, NonLocalAttn)] == [5, 4, 1]
    plus = build(compose_cfg(["model=unetplusplus", "model.attention.decoder=se"]).model, "model")
    assert len(inserted(plus, SEModule)) > 0
    deeplab = build(compose_cfg(["model=deeplabv3plus", "model.attention.context=nonlocal"]).model, "model")
    assert len(inserted(deeplab, NonLocalAttn)) == 1
    assert deeplab.eval()(torch.rand(1, 3, 40, 50)).shape == (1, 4, 40, 50)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model=deeplabv3plus", "model.attention.decoder=se"], "model.attention.decoder"),
        (["model=fpn", "model.attention.skip_gates=true"], "model.attention.skip_gates"),
        (["model=unet", "model.attention.decoder=eca"], "model.attention.decoder"),
        (["model=unet", "model.attention.context=aspp"], "model.attention.context"),
        (["model=unet", "model.attention.decoder=se", "+model.options.decoder_attention_type=scse"],
         "model.attention.decoder"),
        (["model=fcn", "+model.attention.context=nonlocal"], "model.attention"),
        (["model=unet", "+model.attention.gates=false"], "model.attention.gates"),  # a typo is never ignored
    ],
)
def test_unsupported_combinations_name_the_key(compose_cfg, overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        build(compose_cfg(overrides).model, "model")


def test_onnx_export_with_every_block_matches_pytorch(compose_cfg, tmp_path):
    pytest.importorskip("onnxruntime")
    from segkit.inference.export import compare, export_onnx, onnx_runner, onnx_session

    everything = ["model.attention.decoder=cbam", "model.attention.skip_gates=true", "model.attention.context=nonlocal"]
    model = build_unet(compose_cfg, everything).eval()
    with torch.no_grad():  # a non-zero non-local branch, so the exported attention matters
        for block in inserted(model, NonLocalAttn):
            block.norm.weight.fill_(1.0)
    path = export_onnx(model, tmp_path / "attention.onnx", (48, 48))
    parity = compare(model, onnx_runner(onnx_session(path)), (2, 3, 45, 71))  # another batch and size
    assert parity.error is None and parity.max_abs_diff < 1e-3
