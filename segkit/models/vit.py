"""Plain ViTs (DINOv2/v3, EVA-02, SigLIP, ... any timm VisionTransformer or Eva) as segmentation encoders.

A plain ViT has one feature map, at the patch stride. Multi-scale decoders (U-Net, FPN, DeepLabV3+,
UPerNet, ...) need a pyramid: ViTDet's simple feature pyramid (Li et al. 2022) builds it from one block's
map with two transposed convolutions (stride 4), one (stride 8), the map itself (stride 16) and a max-pool
(stride 32). `block_indices` takes the four levels from four chosen blocks instead of the last one.

`ViTPyramidEncoder` follows smp's encoder contract (features at strides 1, 2, 4, 8, 16, 32; a 0-channel
map at stride 2, as smp does for transformer encoders), so every smp decoder takes it unchanged.
`LinearProbe` is the DINOv2 paper's linear protocol: BatchNorm and a 1x1 convolution on the patch features.

Any patch size and input size: images are padded to the patch size inside the encoder, timm interpolates
the position embeddings (`dynamic_img_size`), and the patch grid is resampled to the exact 1/16 size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from segkit.errors import ConfigError

PLAIN_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.eva")  # VisionTransformer, Eva (EVA-02, DINOv3)
PYRAMID_STRIDES = (4, 8, 16, 32)
SMP_NAME_PREFIX = "segkit-vit:"  # the smp encoder registry key of a ViT pyramid (see smp_encoder_name)


def is_plain_vit(name: str) -> bool:
    """Whether timm builds `name` (a model name, optionally with a .tag) as a plain ViT."""
    base = name.split(".")[0]
    if not timm.models.is_model(base):
        return False
    return timm.models.model_entrypoint(base).__module__ in PLAIN_VIT_MODULES


def create_vit(name: str, *, pretrained: bool = False, drop_path_rate: float = 0.0) -> nn.Module:
    """The timm ViT without its classifier, for any input size (position embeddings interpolated)."""
    return timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True,
                             drop_path_rate=drop_path_rate)


def patch_size(vit: nn.Module) -> int:
    size: Any = vit.patch_embed.patch_size  # type: ignore[union-attr]
    return int(size[0] if isinstance(size, Sequence) else size)


def vit_features(vit: nn.Module, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
    """The spatial maps (B, D, H/p, W/p) of blocks `indices`, prefix (class, register) tokens dropped;
    the images are padded (with 0, the mean colour after normalisation) to a multiple of the patch."""
    patch = patch_size(vit)
    pad_h, pad_w = -images.shape[-2] % patch, -images.shape[-1] % patch
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    unique = sorted(set(indices))  # timm returns each block once, in block order
    maps = vit.forward_intermediates(  # type: ignore[operator]
        images, indices=unique, output_fmt="NCHW", intermediates_only=True)
    return [maps[unique.index(i)] for i in indices]


def _block_indices(vit: nn.Module, chosen: Sequence[int] | None) -> list[int]:
    blocks = len(vit.blocks)  # type: ignore[arg-type]
    if chosen is None:
        return [blocks - 1] * len(PYRAMID_STRIDES)  # ViTDet: every level from the last block
    indices = [int(i) for i in chosen]
    if len(indices) != len(PYRAMID_STRIDES) or not all(-blocks <= i < blocks for i in indices):
        raise ConfigError("backbone.block_indices",
                          f"four block indices in [0, {blocks}) for strides 4, 8, 16, 32 (or null: the last block)")
    return [i % blocks for i in indices]


def _pyramid_level(dim: int, stride: int) -> tuple[nn.Module, int]:
    """ViTDet's operation from the stride-16 map to `stride`, and its output channels."""
    if stride == 4:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)), dim // 4
    if stride == 8:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if stride == 16:
        return nn.Identity(), dim
    return nn.MaxPool2d(2), dim


class ViTPyramidEncoder(nn.Module):
    """A timm plain ViT + a simple feature pyramid, as an smp encoder (features at strides 1 ... 32).

    `output_stride` 16 or 8 (DeepLab's dilated encoders) keeps the deeper levels at that stride."""

    def __init__(self, name: str, *, in_channels: int = 3, depth: int = 5, output_stride: int = 32,
                 pretrained: bool = False, block_indices: Sequence[int] | None = None,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if in_channels != 3:
            raise ConfigError("backbone.name", f"{name} takes 3-channel images, not {in_channels}")
        self.model = create_vit(name, pretrained=pretrained, drop_path_rate=drop_path_rate)
        self.indices = _block_indices(self.model, block_indices)
        self.depth = depth
        self._output_stride = output_stride
        dim = int(self.model.embed_dim)  # type: ignore[arg-type]
        levels = [_pyramid_level(dim, min(stride, output_stride)) for stride in PYRAMID_STRIDES]
        self.levels = nn.ModuleList(level for level, _ in levels)
        self._out_channels = [in_channels, 0, *(channels for _, channels in levels)][: depth + 1]

    @property
    def out_channels(self) -> list[int]:
        return self._out_channels

    @property
    def output_stride(self) -> int:
        return min(self._output_stride, 2**self.depth)

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        if in_channels != 3:
            raise ConfigError("backbone.name", f"a ViT encoder takes 3-channel images, not {in_channels}")

    def make_dilated(self, output_stride: int) -> None:
        if output_stride != self._output_stride:  # the levels are built for the stride given at construction
            raise ConfigError("backbone.output_stride", f"build the ViT pyramid with output_stride={output_stride}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        height, width = x.shape[-2:]
        grid = (-(-height // 16), -(-width // 16))  # the stride-16 size smp's decoders expect
        maps = vit_features(self.model, x, self.indices)
        features = [x, x.new_empty(x.shape[0], 0, height // 2, width // 2)]
        for level, block_map in zip(self.levels, maps, strict=True):
            if block_map.shape[-2:] != grid:  # patch size other than 16, or padding to the patch
                block_map = F.interpolate(block_map, size=grid, mode="bilinear", align_corners=False)
            features.append(level(block_map))
        return features[: self.depth + 1]


class LinearProbe(nn.Module):
    """DINOv2's linear segmentation protocol: BatchNorm + 1x1 conv on the last block's patch features
    (`block_indices` concatenates several blocks, the paper's "+ms" variant); logits at the patch grid,
    which the Segmenter resizes to the input."""

    def __init__(self, name: str, num_classes: int, *, pretrained: bool = False,
                 block_indices: Sequence[int] | None = None, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.model = create_vit(name, pretrained=pretrained, drop_path_rate=drop_path_rate)
        blocks = len(self.model.blocks)  # type: ignore[arg-type]
        self.indices = [int(i) % blocks for i in (block_indices if block_indices is not None else [blocks - 1])]
        channels = int(self.model.embed_dim) * len(self.indices)  # type: ignore[arg-type]
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat(vit_features(self.model, x, self.indices), dim=1))


def smp_encoder_name(name: str, pretrained: bool, backbone: Mapping[str, Any]) -> str:
    """Register a ViT pyramid in smp's encoder table and return its key, so smp.create_model builds any
    of its decoders on it (smp takes plain ViTs only for DPT)."""
    import segmentation_models_pytorch as smp

    indices = backbone.get("block_indices")
    params = {"name": name, "pretrained": pretrained, "drop_path_rate": float(backbone.get("drop_path_rate") or 0.0),
              "block_indices": None if indices is None else [int(i) for i in indices]}
    key = f"{SMP_NAME_PREFIX}{name}:{params['pretrained']}:{params['drop_path_rate']}:{params['block_indices']}"
    smp.encoders.encoders.setdefault(key, {"encoder": ViTPyramidEncoder, "pretrained_settings": {}, "params": params})
    return key


def layer_decay_groups(model: nn.Module, lr: float, layer_decay: float, head_lr: float) -> list[dict[str, Any]]:
    """Layer-wise learning-rate decay (BEiT, DINOv2 fine-tuning): block i of n gets lr * decay^(n - i),
    the patch embedding lr * decay^(n + 1), everything outside the ViT (pyramid, decoder, head) `head_lr`.
    timm's layer map (`group_matcher`) assigns the ViT's parameters to layers."""
    from timm.optim import param_groups_layer_decay

    vit = cast(nn.Module, model.encoder)  # the Segmenter's encoder: for a ViT backbone, the timm model itself
    if not hasattr(vit, "group_matcher") or not hasattr(vit, "blocks"):
        raise ConfigError("optimizer.layer_decay", f"needs a ViT backbone, not {type(vit).__name__}")
    groups = []
    for group in param_groups_layer_decay(vit, weight_decay=0.0, layer_decay=layer_decay):
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr * float(group["lr_scale"])})
    in_vit = {id(p) for p in vit.parameters()}  # the pyramid and the decoder are new: they learn at head_lr
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_vit]
    if rest:
        groups.append({"params": rest, "lr": head_lr})
    return groups
