"""Attention blocks from the literature, inserted into smp networks from the `model.attention` node.

- `decoder: se | cbam` - squeeze-and-excitation (Hu et al. 2018) or CBAM (Woo et al. 2018) after
  each U-Net / U-Net++ decoder block: timm's modules fill the block's own `attention2` slot, the
  place smp puts its `decoder_attention_type=scse`.
- `skip_gates: true` - additive attention gates on the U-Net skip connections (Oktay et al. 2018,
  Attention U-Net): the coarser decoder feature decides which skip pixels pass.
- `context: nonlocal` - a non-local / self-attention block (Wang et al. 2018; timm's `NonLocalAttn`)
  on the deepest encoder feature, before any smp decoder sees it.

Each option changes modules inside the same network; the training loop, export and checkpoints
see one `nn.Module` as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import NonLocalAttn, SEModule
from timm.layers.cbam import CbamModule
from torch import nn

from segkit.errors import ConfigError

DECODER_BLOCKS = {"se": SEModule, "cbam": CbamModule}
CONTEXT_BLOCKS = {"nonlocal": NonLocalAttn}
# Which architecture has which slot is a column of segkit.models.ARCHITECTURES, checked before this runs.
ATTENTION_KEYS = ("decoder", "skip_gates", "context")


class AttentionGate(nn.Module):
    """skip * sigmoid(psi(relu(theta(skip) + up(phi(gate))))): additive attention of Attention U-Net.

    phi runs at the gate's (coarser) resolution and is upsampled, which is cheaper than
    downsampling the skip and gives the same per-pixel coefficients up to interpolation.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int | None = None) -> None:
        super().__init__()
        inter = inter_channels or max(skip_channels // 2, 8)
        self.theta = nn.Conv2d(skip_channels, inter, kernel_size=1, bias=False)
        self.phi = nn.Conv2d(gate_channels, inter, kernel_size=1)
        self.psi = nn.Conv2d(inter, 1, kernel_size=1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        gate = F.interpolate(self.phi(gate), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return skip * torch.sigmoid(self.psi(F.relu(self.theta(skip) + gate)))


class GatedSkipBlock(nn.Module):
    """An smp U-Net decoder block whose skip connection first passes an attention gate."""

    def __init__(self, block: nn.Module, gate: AttentionGate) -> None:
        super().__init__()
        self.block = block
        self.gate = gate

    def forward(
        self, feature_map: torch.Tensor, target_height: int, target_width: int,
        skip_connection: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if skip_connection is not None:
            skip_connection = self.gate(skip_connection, feature_map)
        return self.block(feature_map, target_height, target_width, skip_connection=skip_connection)


class ContextDecoder(nn.Module):
    """Runs `context` on the deepest encoder feature, then the original smp decoder."""

    def __init__(self, context: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.context = context
        self.decoder = decoder

    def forward(self, features: list[torch.Tensor]) -> Any:
        return self.decoder([*features[:-1], self.context(features[-1])])


def add_attention(net: nn.Module, attention: Mapping[str, Any] | None) -> nn.Module:
    """Insert the blocks `attention` asks for into the smp network `net` (in place); return it.

    The architecture must have each requested slot (segkit.models.check_attention_slots)."""
    attention = dict(attention or {})
    unknown = sorted(set(attention) - set(ATTENTION_KEYS))
    if unknown:
        raise ConfigError(f"model.attention.{unknown[0]}", f"unknown key; known: {', '.join(ATTENTION_KEYS)}")
    decoder, skip_gates, context = attention.get("decoder"), attention.get("skip_gates"), attention.get("context")
    if decoder is not None:
        _add_decoder_attention(net, decoder)
    if skip_gates:
        _add_skip_gates(net)
    if context is not None:
        _add_context(net, context)
    return net


def _add_decoder_attention(net: nn.Module, kind: str) -> None:
    """SE / CBAM into the `attention2` slot of each U-Net / U-Net++ decoder block."""
    if kind not in DECODER_BLOCKS:
        raise _unknown("decoder", kind, DECODER_BLOCKS)
    decoder: Any = net.decoder  # an smp decoder: its blocks' attributes are duck-typed
    for block in decoder.modules():
        slot = getattr(block, "attention2", None)
        if slot is None:  # not a decoder block, or an empty U-Net++ node
            continue
        if not isinstance(slot.attention, nn.Identity):
            raise ConfigError("model.attention.decoder", "set it or model.options.decoder_attention_type, not both")
        block.attention2 = DECODER_BLOCKS[kind](block.conv2[0].out_channels)


def _add_skip_gates(net: nn.Module) -> None:
    # smp's UnetDecoder pairs block i with the (i+1)-th deepest encoder feature; the gate signal is
    # the block's input: the deepest feature for block 0, the previous block's output after that.
    encoder: Any = net.encoder  # an smp encoder and decoder
    decoder: Any = net.decoder
    deep_to_shallow = list(encoder.out_channels)[1:][::-1]
    gate_channels, skips = deep_to_shallow[0], deep_to_shallow[1:]
    blocks = decoder.blocks
    for index, block in enumerate(blocks):
        if index < len(skips):  # the last block has no skip
            blocks[index] = GatedSkipBlock(block, AttentionGate(skips[index], gate_channels))
        gate_channels = block.conv2[0].out_channels


def _add_context(net: nn.Module, kind: str) -> None:
    if kind not in CONTEXT_BLOCKS:
        raise _unknown("context", kind, CONTEXT_BLOCKS)
    encoder: Any = net.encoder
    channels = encoder.out_channels[-1]
    net.decoder = ContextDecoder(CONTEXT_BLOCKS[kind](channels), net.get_submodule("decoder"))


def _unknown(key: str, kind: object, known: Mapping[str, Any]) -> ConfigError:
    return ConfigError(f"model.attention.{key}", f"unknown block {kind!r}; choose {', '.join(known)} or null")
