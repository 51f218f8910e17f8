"""Reading files: images and masks (PIL / torchvision decoders), colour-coded masks, split lists; the cache home."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from segkit import safe_files
from segkit.errors import ConfigError, DataError

# torchvision 0.29 announces its decoders' move to torchcodec; they remain the fast path here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
JPEG_SUFFIXES = (".jpg", ".jpeg")
MAX_PIXELS_ENV = "SEGKIT_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 1 << 28  # 268 M pixels (16384 x 16384): a larger header is a decompression bomb


def max_image_pixels() -> int:
    """The most pixels segkit decodes from one image file; raise it with SEGKIT_MAX_IMAGE_PIXELS."""
    import os

    value = os.environ.get(MAX_PIXELS_ENV, "")
    return int(value) if value.isdigit() else DEFAULT_MAX_PIXELS


def check_pixels(path: Path) -> None:
    """Refuse, before decoding, an image whose header declares more than max_image_pixels() pixels (a small
    file can declare 100000 x 100000); only the header is read. Unknown formats are left to the decoder."""
    limit = max_image_pixels()
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # this check replaces Pillow's own for the header read
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, ValueError):
        return
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if width * height > limit:
        raise DataError(f"{path}: header declares {width}x{height} pixels, more than {limit} (decompression "
                        f"bomb?); refused before decoding. If the image is genuine, raise {MAX_PIXELS_ENV}")


def user_cache_dir() -> Path:
    """Where segkit keeps caches unless dataset.cache_dir says otherwise: the user cache directory.

    platformdirs' answer when it is installed ($XDG_CACHE_HOME/segkit or ~/.cache/segkit on Linux,
    ~/Library/Caches/segkit on macOS), else $XDG_CACHE_HOME/segkit or ~/.cache/segkit.
    """
    try:
        from platformdirs import user_cache_path
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segkit"
    return user_cache_path("segkit", appauthor=False)


def require_file(path: Path, what: str) -> None:
    """A missing or zero-byte file as one line: 'not found' or 'empty file'."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except OSError:
        return  # reading it reports why
    if size == 0 and path.is_file():
        raise DataError(f"{path}: empty file (0 bytes, an interrupted copy or download?); fix: the file is wrong, "
                        "copy it again")


def read_image(path: Path, device: torch.device | None = None) -> torch.Tensor:
    """Decode an image file to uint8 RGB, shape (3, H, W), with torchvision's native decoders.

    With a CUDA `device`, JPEGs are decoded there by nvjpeg (other formats are decoded on the CPU).
    """
    require_file(path, "image")
    check_pixels(path)
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


def read_mask(path: Path, rgb_fix: str = "the file is wrong (masks hold class ids, one channel)") -> torch.Tensor:
    """Read a single-channel label mask (8/16-bit, palette PNGs as indices) to int64 (H, W).

    `rgb_fix`: the fix for a colour (RGB) file, which the reader knows (a colour table key, or none).
    """
    require_file(path, "mask")
    check_pixels(path)
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise DataError(f"{path}: mask has mode {img.mode}, expected single-channel class ids; fix: {rgb_fix}")
            array = np.asarray(img)
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read mask ({error})") from None
    return torch.from_numpy(array.astype(np.int64))


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

    def translate(self, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 -> the colours packed as r << 16 | g << 8 | b, class ids, where a colour is unknown."""
        keys = _key(rgb.astype(np.int64))
        pos = np.clip(np.searchsorted(self.keys, keys), 0, len(self.keys) - 1)
        known = self.keys[pos] == keys
        return torch.from_numpy(keys), torch.from_numpy(self.ids[pos]), torch.from_numpy(~known)

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


def read_rgb_mask(path: Path) -> np.ndarray | None:
    """An RGB(A) mask file as (H, W, 3) uint8, or None for a single-channel or palette mask."""
    require_file(path, "mask")
    try:
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA"):
                return None
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read mask ({error})") from None


def read_color_mask(path: Path, table: ColorTable | None, rgb_fix: str = "the file is wrong") -> torch.Tensor:
    """RGB masks through `table`; single-channel and palette masks are class ids already."""
    if table is None:
        return read_mask(path, rgb_fix)
    require_file(path, "mask")
    check_pixels(path)
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


def read_stem_list(path: Path) -> list[str]:
    """Stems listed in `path`, in file order; a stem listed twice is an error naming the file.

    One stem per line, as editors on any system save it: UTF-8 with or without a byte-order
    mark, Unix or Windows line endings, blank lines and `#` comment lines skipped, spaces
    around a stem trimmed and spaces inside it kept (`my image 01`).
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read split list ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: split list is not UTF-8 text (byte {error.start}); "
                        "save it as UTF-8") from None
    stems: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stem = line.strip().lstrip("\ufeff").strip()  # a byte-order mark, also where files were concatenated
        if not stem or stem.startswith("#"):
            continue
        if "\x00" in stem:
            raise DataError(f"{path}:{number}: a NUL byte; is this a text file (UTF-16 is not read)?")
        if stem in seen:
            raise DataError(f"{path}:{number}: stem '{stem}' is listed twice (also line {seen[stem]})")
        seen[stem] = number
        stems.append(stem)
    return stems


def write_stem_list(path: Path, stems: Iterable[str]) -> None:
    safe_files.write_text(path, "".join(f"{stem}\n" for stem in stems))  # never through a planted link
