"""Data: readers that yield (uint8 image CHW, int64 mask HW) and the loaders around them."""

from segkit.data.base import SegmentationDataset, letterbox
from segkit.data.folder import FolderDataset
from segkit.data.synthetic import SyntheticShapes

__all__ = ["FolderDataset", "SegmentationDataset", "SyntheticShapes", "letterbox"]
