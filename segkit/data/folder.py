"""Images and masks in two directories, matched by file stem (`img1.jpg` <-> `img1.png`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from segkit.data.base import SegmentationDataset
from segkit.data.io import IMAGE_SUFFIXES, read_image, read_mask
from segkit.errors import DataError


class FolderDataset(SegmentationDataset):
    def __init__(
        self,
        *,
        split: str,
        root: str,
        image_dir: str = "images/{split}",
        mask_dir: str = "masks/{split}",
        remap: Mapping[int, int] | None = None,
        **common,
    ) -> None:
        super().__init__(split=split, **common)
        self.root = Path(root).expanduser()
        self.image_dir = self.root / image_dir.format(split=split)
        self.mask_dir = self.root / mask_dir.format(split=split)
        self.remap = {int(k): int(v) for k, v in (remap or {}).items()}
        self.pairs = self._match_pairs()

    def _match_pairs(self) -> list[tuple[Path, Path]]:
        for directory, key in ((self.image_dir, "image_dir"), (self.mask_dir, "mask_dir")):
            if not directory.is_dir():
                raise DataError(f"{directory}: directory not found (check dataset.root and dataset.{key})")
        images = _files_by_stem(self.image_dir)
        masks = _files_by_stem(self.mask_dir)
        missing = sorted(set(images) - set(masks))
        if missing:
            raise DataError(f"{images[missing[0]]}: no mask with stem '{missing[0]}' in {self.mask_dir}"
                            + (f" ({len(missing) - 1} more images without masks)" if len(missing) > 1 else ""))
        if not images:
            raise DataError(f"{self.image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        return [(images[stem], masks[stem]) for stem in sorted(images)]

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self, index: int) -> str:
        return str(self.pairs[index][1])

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if self.remap:
            remapped = mask.clone()
            for value, target in self.remap.items():
                remapped[mask == value] = target
            mask = remapped
        return image, mask


def _files_by_stem(directory: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise DataError(f"{path}: duplicate stem '{path.stem}' (also {files[path.stem].name})")
        files[path.stem] = path
    return files
