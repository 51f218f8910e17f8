"""Decode image and mask files into tensors, with errors that name the file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from segkit.errors import DataError

# torchvision 0.29 announces its decoders' move to torchcodec; they remain the fast path here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
JPEG_SUFFIXES = (".jpg", ".jpeg")


def read_image(path: Path, device: torch.device | None = None) -> torch.Tensor:
    """Decode an image file to uint8 RGB, shape (3, H, W), with torchvision's native decoders.

    With a CUDA `device`, JPEGs are decoded there by nvjpeg (other formats are decoded on the CPU).
    """
    if device is not None and device.type == "cuda" and path.suffix.lower() in JPEG_SUFFIXES:
        try:
            return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB, device=device)
        except RuntimeError as error:
            raise DataError(f"{path}: cannot decode JPEG on {device} ({error})") from None
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError:
        pass  # formats torchvision.io cannot decode (TIFF, 16-bit PNG) go through Pillow
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read image ({error})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_mask(path: Path) -> torch.Tensor:
    """Read a single-channel label mask (8/16-bit, palette PNGs as indices) to int64 (H, W)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise DataError(
                    f"{path}: mask has mode {img.mode}, expected single-channel class ids "
                    "(an RGB mask needs a color table)"
                )
            array = np.asarray(img)
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read mask ({error})") from None
    return torch.from_numpy(array.astype(np.int64))
