"""Colour-coded (RGB) masks: map each pixel's colour to a class id through a colour table.

Some tools export masks as RGB images, one colour per class. A colour that is not in the
table is an error naming the file and the colour, never a silent class: a wrong table would
otherwise train on garbage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segkit.data.io import read_mask
from segkit.errors import ConfigError, DataError


class ColorTable:
    """colors[i] -> class i; ignore_colors -> ignore_index."""

    def __init__(
        self, colors: Sequence[Sequence[int]], ignore_index: int, ignore_colors: Sequence[Sequence[int]] = ()
    ) -> None:
        entries = [(tuple(c), i) for i, c in enumerate(colors)]
        entries += [(tuple(c), ignore_index) for c in ignore_colors]
        for color, _ in entries:
            if len(color) != 3 or not all(0 <= int(v) <= 255 for v in color):
                raise ConfigError("dataset.colors", f"{list(color)} is not an [r, g, b] colour (0..255)")
        keys = np.array([_key(np.array(c, dtype=np.int64)) for c, _ in entries], dtype=np.int64)
        if len(set(keys.tolist())) != len(keys):
            raise ConfigError("dataset.colors", "the same colour is listed twice")
        order = np.argsort(keys)
        self.keys = keys[order]
        self.ids = np.array([i for _, i in entries], dtype=np.int64)[order]

    def lookup(self, rgb: np.ndarray, path: Path) -> torch.Tensor:
        """(H, W, 3) uint8 -> (H, W) int64 class ids."""
        keys = _key(rgb.astype(np.int64))
        pos = np.clip(np.searchsorted(self.keys, keys), 0, len(self.keys) - 1)
        known = self.keys[pos] == keys
        if not known.all():
            unknown = np.unique(keys[~known])[:5]
            shown = ", ".join(str([int(k >> 16), int(k >> 8 & 255), int(k & 255)]) for k in unknown)
            raise DataError(f"{path}: mask colours {shown} are not in dataset.colors / dataset.ignore_colors")
        return torch.from_numpy(self.ids[pos])


def read_color_mask(path: Path, table: ColorTable | None) -> torch.Tensor:
    """RGB masks through `table`; single-channel and palette masks are class ids already."""
    if table is None:
        return read_mask(path)
    try:
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA"):
                return read_mask(path)
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read mask ({error})") from None
    return table.lookup(rgb, path)


def _key(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
