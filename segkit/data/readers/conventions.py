"""How public benchmarks store class ids in their label PNGs, and the training ids they are evaluated on.

- ADE20K (SceneParsing, ADEChallengeData2016): 0 is "other objects" (not one of the 150 classes),
  1..150 are the classes. `reduce_zero_label`, as MMSegmentation does: 0 -> ignore_index, every
  other value v -> v - 1, ignore_index stays ignore_index.
- COCO-Stuff 164k (stuffthingmaps_trainval2017): pixel value = COCO category id - 1, so 0..181 with
  255 unlabeled. Ids 1..182 hold 80 things (ids 1..91 minus 11 never used) and 91 stuff classes
  (92..182). `id_mapping: coco_stuff_171` makes the 171 used values contiguous 0..170 (the mapping
  of MMSegmentation's coco_stuff164k converter) and maps the unused and 255 to ignore_index; any
  other value (182 and above: category ids stored without the - 1) is outside the format's table.
- Cityscapes: see segkit/data/readers/cityscapes.py (`labels: label_ids | train_ids`).
"""

from __future__ import annotations

import torch

from segkit.errors import ConfigError

# COCO category ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 and 91 were never used (COCO 2014/2017);
# in the stuffthingmaps PNGs they would be these values (id - 1).
COCO_STUFF_UNUSED_VALUES = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_VALUES = 182  # values 0..181 (category ids 1..182)


def coco_stuff_171(ignore_index: int) -> dict[int, int]:
    """PNG value -> training id 0..170 for the values the format defines: 0..181 and 255.

    The 11 unused ids and 255 (unlabeled) -> ignore_index. Other values (182..254, or 16-bit
    values) are outside the table: readers report them (dataset.unknown_labels).
    """
    used = [v for v in range(COCO_STUFF_VALUES) if v not in COCO_STUFF_UNUSED_VALUES]
    table = {value: ignore_index for value in (*COCO_STUFF_UNUSED_VALUES, 255)}
    table.update({value: train_id for train_id, value in enumerate(used)})
    return table


ID_MAPPINGS = {"coco_stuff_171": coco_stuff_171}


def named_remap(name: str | None, ignore_index: int) -> dict[int, int]:
    """The table of a published id mapping (dataset.id_mapping), or {} for none."""
    if name is None:
        return {}
    if name not in ID_MAPPINGS:
        raise ConfigError("dataset.id_mapping", f"unknown mapping {name!r}; known: {', '.join(ID_MAPPINGS)}")
    return ID_MAPPINGS[name](ignore_index)


def reduce_zero_label(mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """0 -> ignore_index, v -> v - 1, ignore_index kept (MMSegmentation's reduce_zero_label)."""
    reduced = mask - 1
    reduced[(mask == 0) | (mask == ignore_index)] = ignore_index
    return reduced
