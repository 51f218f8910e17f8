"""Build a segmentation network from the config and wrap it so it takes images in [0, 1].

Architectures come from segmentation-models-pytorch with timm (`tu-`) encoders, FCN and
LR-ASPP heads from torchvision on the same timm encoders, and torchvision's complete
segmentation builders. The wrapper `Segmenter` owns normalisation, padding to the encoder's
stride and resizing logits to the input, so training, prediction and export see one model.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.models.segmentation.lraspp import LRASPPHead

from segkit.errors import ConfigError
from segkit.models.attention import ATTENTION_KEYS, add_attention
from segkit.models.vit import LinearProbe, ViTPyramidEncoder, is_plain_vit, patch_size, smp_encoder_name
from segkit.registry import register

SMP, HEAD, TORCHVISION, VIT = "smp", "head", "torchvision", "vit"
CONTEXT_ONLY = ("context",)


@dataclass(frozen=True)
class Architecture:
    """What segkit knows about a `model.arch`: one row of ARCHITECTURES."""

    family: str  # smp: smp.create_model on a timm encoder | head: a timm encoder + torchvision's FCN / LR-ASPP
    #              head (EncoderHead) | torchvision: torchvision's complete builder, its own backbone |
    #              vit: a head on a plain ViT's patch features (segkit/models/vit.py)
    builder: str  # the smp class name, the head, or the torchvision.models.segmentation function
    dilates: bool = False  # takes backbone.output_stride 8 / 16 (dilated encoder)
    attention: tuple[str, ...] = ()  # the model.attention keys its network has slots for (segkit/models/attention.py)
    needs_vit: bool = False  # only on a plain ViT backbone (DPT, the linear probe)


ARCHITECTURES: dict[str, Architecture] = {
    "deeplabv3": Architecture(SMP, "DeepLabV3", dilates=True, attention=CONTEXT_ONLY),
    "deeplabv3plus": Architecture(SMP, "DeepLabV3Plus", dilates=True, attention=CONTEXT_ONLY),
    "unet": Architecture(SMP, "Unet", attention=("decoder", "skip_gates", "context")),
    "unetplusplus": Architecture(SMP, "UnetPlusPlus", attention=("decoder", "context")),
    "fpn": Architecture(SMP, "FPN", attention=CONTEXT_ONLY),
    "pspnet": Architecture(SMP, "PSPNet", attention=CONTEXT_ONLY),
    "segformer": Architecture(SMP, "Segformer", attention=CONTEXT_ONLY),
    "upernet": Architecture(SMP, "UPerNet", attention=CONTEXT_ONLY),
    "dpt": Architecture(SMP, "DPT", needs_vit=True),
    "linear": Architecture(VIT, "linear", needs_vit=True),
    "fcn": Architecture(HEAD, "fcn", dilates=True),
    "lraspp": Architecture(HEAD, "lraspp", dilates=True),
    **{name: Architecture(TORCHVISION, name) for name in (
        "fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
        "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")},
}


class Segmenter(nn.Module):
    """images (B, 3, H, W) float in [0, 1] -> logits (B, num_classes, H, W), any H and W."""

    mean: torch.Tensor  # buffers, (1, 3, 1, 1)
    std: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        encoder: nn.Module,
        *,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        stride: int = 32,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.encoder = encoder  # the same module as inside net: used for freezing and lr groups
        self.num_classes = num_classes
        self.stride = stride
        self.freeze_encoder = freeze_encoder
        # Temperature scaling (segkit-calibrate): logits / T. 1 while training; a checkpoint's fitted T is
        # set by segkit.load, so predict, evaluate and export all give calibrated probabilities.
        self.temperature = 1.0
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        if freeze_encoder:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics too
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the timm encoder: its stages are recomputed in backward."""
        timm_model: Any = getattr(self.encoder, "model", self.encoder)  # smp's timm wrapper, or a timm ViT itself
        if not hasattr(timm_model, "set_grad_checkpointing"):
            raise ConfigError("trainer.activation_checkpointing",
                              f"needs a timm encoder (smp `tu-` or fcn/lraspp), not {type(self.encoder).__name__}")
        timm_model.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        x = (images - self.mean) / self.std
        pad_h, pad_w = -height % self.stride, -width % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # 0 after normalisation = the mean colour
        out = self.net(x)
        if isinstance(out, Mapping):  # torchvision models return {"out": ..., "aux": ...}
            out = out["out"]
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out = out[..., :height, :width]
        return out / self.temperature if self.temperature != 1.0 else out


class EncoderHead(nn.Module):
    """A timm encoder (through smp) with torchvision's FCN or LR-ASPP head."""

    def __init__(self, encoder: nn.Module, arch: str, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        channels: list[int] = list(cast(Sequence[int], encoder.out_channels))
        self.arch = arch
        if arch == "fcn":
            self.head = FCNHead(channels[-1], num_classes)
        else:
            self.head = LRASPPHead(channels[-3], channels[-1], num_classes, inter_channels=128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        if self.arch == "fcn":
            return self.head(features[-1])
        return self.head({"low": features[-3], "high": features[-1]})


@register("model", "segkit.models.build_model")  # the name configs use: the package's re-export
def build_model(
    *,
    arch: str,
    backbone: Mapping[str, Any],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    options: Mapping[str, Any] | None = None,
    attention: Mapping[str, Any] | None = None,
) -> Segmenter:
    """Assemble `arch` on `backbone` (the config's backbone node) for `num_classes` classes.

    `attention` (the model.attention node: decoder / skip_gates / context) inserts attention blocks
    into smp architectures (segkit/models/attention.py)."""
    options = dict(options or {})
    if arch not in ARCHITECTURES:
        raise ConfigError("model.arch", f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    check_attention_slots(arch, attention)
    name, output_stride = backbone["name"], backbone.get("output_stride")
    if output_stride is not None and output_stride not in (8, 16, 32):
        raise ConfigError("backbone.output_stride", f"must be 8, 16 or 32, got {output_stride}")
    if output_stride not in (None, 32) and not spec.dilates:
        raise ConfigError("backbone.output_stride", f"{arch} does not use output_stride; set it to null")

    pretrained, weights_file = bool(backbone.get("pretrained")), backbone.get("weights")
    download = pretrained and not weights_file
    vit = spec.family != TORCHVISION and is_plain_vit(name)
    if spec.needs_vit and not vit:
        raise ConfigError("backbone.name", f"{arch} takes a plain ViT (e.g. vit_small_patch14_dinov2), not {name!r}")
    if backbone.get("block_indices") is not None and not vit:
        raise ConfigError("backbone.block_indices", f"only for plain ViT backbones, not {name!r}")
    stride = 32
    if spec.family == TORCHVISION:
        net, encoder = _torchvision_model(spec.builder, num_classes, download, options)
    elif vit:
        net, encoder = _vit_model(arch, name, output_stride, num_classes, options, download, backbone)
        if spec.family == SMP:
            add_attention(net, attention)
        # the linear probe pads to the patch size; the pyramid decoders and DPT (its coarsest map at 1/32) to 32
        stride = patch_size(encoder) if arch == "linear" else 32
    else:
        net, encoder = _timm_model(arch, name, output_stride, num_classes, options, download)
        if spec.family == SMP:
            add_attention(net, attention)  # checks the node's keys even when nothing is switched on
    if pretrained and weights_file:
        load_encoder_weights(encoder, name, weights_file)
    return Segmenter(
        net, encoder, num_classes=num_classes, mean=mean, std=std, stride=stride,
        freeze_encoder=bool(backbone.get("freeze")),
    )


def check_attention_slots(arch: str, attention: Mapping[str, Any] | None) -> None:
    """Every attention block switched on needs its slot in `arch`'s network (ARCHITECTURES[arch].attention)."""
    wanted = [key for key, value in (attention or {}).items() if value]
    slots = ARCHITECTURES[arch].attention
    if wanted and not slots:
        raise ConfigError("model.attention", f"attention blocks go into smp architectures, not {arch}")
    for key in wanted:
        if key in ATTENTION_KEYS and key not in slots:
            able = [name for name, spec in ARCHITECTURES.items() if key in spec.attention]
            raise ConfigError(f"model.attention.{key}",
                              f"{arch} has no slot for these blocks; use model={' or model='.join(able)}")


def _timm_model(
    arch: str, name: str, output_stride: int | None, num_classes: int, options: dict[str, Any], download: bool
) -> tuple[nn.Module, nn.Module]:
    weights = True if download else None  # smp's `tu-` encoders take True for timm's default weights
    try:
        spec = ARCHITECTURES[arch]
        if spec.family == HEAD:
            encoder = smp.encoders.get_encoder(f"tu-{name}", weights=weights, output_stride=output_stride or 32)
            return EncoderHead(encoder, spec.builder, num_classes), encoder
        if output_stride is not None:
            options["encoder_output_stride"] = output_stride
        net = smp.create_model(
            spec.builder, encoder_name=f"tu-{name}", encoder_weights=weights, classes=num_classes, **options
        )
    except (RuntimeError, ValueError, TypeError, KeyError, AssertionError, OSError) as error:
        if download and not isinstance(error, (TypeError, KeyError, AssertionError)):
            raise _offline_error(name, error) from None
        raise _explain_build_error(arch, name, output_stride, error) from None
    return net, net.encoder


def _vit_model(
    arch: str, name: str, output_stride: int | None, num_classes: int, options: dict[str, Any], download: bool,
    backbone: Mapping[str, Any],
) -> tuple[nn.Module, nn.Module]:
    """A decoder on a plain ViT; the second value is the timm ViT itself (what freezing, the layer decay,
    activation checkpointing and local weights act on; the pyramid and decoder always train)."""
    spec = ARCHITECTURES[arch]
    drop_path = float(backbone.get("drop_path_rate") or 0.0)
    indices = backbone.get("block_indices")
    try:
        if spec.family == VIT:
            probe = LinearProbe(name, num_classes, pretrained=download, block_indices=indices, drop_path_rate=drop_path)
            return probe, probe.model
        if spec.family == HEAD:
            encoder = ViTPyramidEncoder(name, output_stride=output_stride or 32, pretrained=download,
                                        block_indices=indices, drop_path_rate=drop_path)
            return EncoderHead(encoder, spec.builder, num_classes), encoder.model
        if output_stride is not None:
            options["encoder_output_stride"] = output_stride
        if arch == "dpt":  # smp's own ViT encoder; timm interpolates the position embeddings
            options.setdefault("dynamic_img_size", True)
            options.setdefault("drop_path_rate", drop_path)
            if indices is not None:
                options.setdefault("encoder_output_indices", [int(i) for i in indices])
            net = smp.create_model(spec.builder, encoder_name=f"tu-{name}", encoder_weights=True if download else None,
                                   classes=num_classes, **options)
            if patch_size(net.encoder.model) != 16:  # smp's DPT scales its maps by stride / 4: patch 16 only
                raise ConfigError("backbone.name", f"smp's DPT needs a patch-16 ViT, {name} has patch "
                                  f"{patch_size(net.encoder.model)}; use model=upernet / unet / fpn on it instead")
        else:
            net = smp.create_model(spec.builder, encoder_name=smp_encoder_name(name, download, backbone),
                                   encoder_weights=None, classes=num_classes, **options)
    except (RuntimeError, ValueError, TypeError, KeyError, AssertionError, OSError) as error:
        if download and not isinstance(error, (TypeError, KeyError, AssertionError)):
            raise _offline_error(name, error) from None
        raise _explain_build_error(arch, name, output_stride, error) from None
    return net, net.encoder.model


def _offline_error(name: str, error: Exception) -> ConfigError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ConfigError(
        "backbone.pretrained",
        f"downloading ImageNet weights for {name} failed ({reason}); offline, pass "
        "backbone.weights=/path/to/weights (.pth/.safetensors) or set backbone.pretrained=false",
    )


def _explain_build_error(arch: str, name: str, output_stride: int | None, error: Exception) -> ConfigError:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "Unknown model" in text or "Invalid model" in text:
        return ConfigError("backbone.name", f"{name!r} is not a timm model ({text})")
    if "output_stride" in text or "dilation" in text.lower():
        return ConfigError(
            "backbone.output_stride", f"{name} cannot run {arch} at output_stride {output_stride} ({text})"
        )
    if "unexpected keyword" in text:
        return ConfigError("model.options", f"{arch}: {text}")
    return ConfigError("model", f"{arch} cannot be built on backbone {name}: {text}")


def _torchvision_model(
    arch: str, num_classes: int, download: bool, options: dict[str, Any]
) -> tuple[nn.Module, nn.Module]:
    builder = getattr(torchvision.models.segmentation, arch)
    try:
        net = builder(
            weights=None, weights_backbone="DEFAULT" if download else None, num_classes=num_classes, **options
        )
    except OSError as error:  # urllib errors are OSErrors: offline
        raise _offline_error(arch, error) from None
    except TypeError as error:
        raise ConfigError("model.options", f"{arch}: {error}") from None
    return net, net.backbone


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def load_encoder_weights(encoder: nn.Module, name: str, weights: str) -> None:
    """Load local pretrained weights (a timm / torchvision state dict, or a Hugging Face / timm hub folder
    holding one of WEIGHT_FILES) into the encoder. A ViT's weights pass through timm's own checkpoint
    filter for that model, which converts the original releases (DINOv2, EVA, ...) and resamples the
    position embeddings to the model's grid."""
    path = Path(weights).expanduser()
    if path.is_dir():
        found = [path / file for file in WEIGHT_FILES if (path / file).is_file()]
        if not found:
            raise ConfigError("backbone.weights", f"{path}: a folder without {' or '.join(WEIGHT_FILES)}")
        path = found[0]
    if not path.is_file():
        raise ConfigError("backbone.weights", f"{path}: file not found")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line report
        raise ConfigError("backbone.weights", f"{path}: cannot read weights ({error})") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    target = getattr(encoder, "model", encoder)  # smp's timm wrapper keeps the timm model in .model
    filter_fn = getattr(sys.modules.get(type(target).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None and isinstance(state, Mapping) and hasattr(target, "patch_embed"):
        state = filter_fn(dict(state), target)
    own = target.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ConfigError("backbone.weights", f"{path}: no tensor matches the {name} encoder (wrong model?)")
    target.load_state_dict(matched, strict=False)
