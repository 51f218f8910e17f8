"""`segkit-split IMAGE_DIR --masks MASK_DIR`: write train/val/test (or k-fold) list files of stems.

The folder reader reads them with `dataset.split_file` (e.g. `splits/{split}.txt`, or
`splits/fold{fold}/{split}.txt` with `dataset.fold=k`). The same seed gives the same lists.

Stratification (`--stratify`) spreads every class over the splits in proportion: images
are grouped by their rarest present class, groups are taken rarest first, each shuffled,
and each image goes to the split furthest below its share so far. A class present in a
handful of images thus lands in validation too instead of by chance only in training.

Grouping (`--group REGEX`) keeps images that belong together in one split: frames of one video
sequence, slices of one scan, tiles of one scene. An image's group is the first match of REGEX in
its stem (its first capture group, if REGEX has one); whole groups go, largest first, to the split
(or fold) furthest below its share in images, so no validation image has a near-copy in training.
CamVid's `0016E5_07959` and `0016E5_07961` are one second apart: split frame by frame, validation
scores frames the model has all but seen (docs/results.md: the held-out sequence).
"""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segkit.data.io import IMAGE_SUFFIXES, write_stem_list
from segkit.data.readers.pairs import files_by_stem
from segkit.errors import DataError, SegkitError


def mask_classes(path: Path) -> frozenset[int]:
    """Raw values present in a mask (RGB masks: one value per colour), for stratification."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB") if img.mode in ("RGB", "RGBA") else img)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read mask ({error})") from None
    if array.ndim == 3:
        array = (array[..., 0].astype(np.int64) << 16) | (array[..., 1].astype(np.int64) << 8) | array[..., 2]
    return frozenset(int(v) for v in np.unique(array))


def assign(
    stems: Sequence[str],
    fractions: Sequence[float],
    seed: int,
    labels: Sequence[frozenset[int]] | None = None,
) -> list[int]:
    """The split index of each stem: shares as `fractions`, spread per rarest class when `labels`."""
    rng = random.Random(seed)
    order = sorted(range(len(stems)), key=lambda i: stems[i])
    if labels is None:
        groups = [order]
    else:
        frequency = Counter(label for item in labels for label in item)
        def rarest(i: int) -> tuple[int, int]:
            return min(((frequency[c], c) for c in labels[i]), default=(len(stems) + 1, -1))
        keyed: dict[tuple[int, int], list[int]] = {}
        for i in order:
            keyed.setdefault(rarest(i), []).append(i)
        groups = [keyed[key] for key in sorted(keyed)]
    for group in groups:
        rng.shuffle(group)
    ordered = [i for group in groups for i in group]
    result = [0] * len(stems)
    for i, target in zip(ordered, place([1] * len(ordered), fractions), strict=True):
        result[i] = target
    return result


def place(sizes: Sequence[int], fractions: Sequence[float]) -> list[int]:
    """The split of each unit (an image, or a group of `size` images), taken in the order given: the one
    furthest below its share of the images placed so far (ties: the first split)."""
    total = sum(fractions)
    shares = [f / total for f in fractions]
    counts = [0] * len(shares)
    placed = 0
    targets = []
    for size in sizes:
        placed += size
        target = max(range(len(shares)), key=lambda s: (shares[s] * placed - counts[s], -s))
        counts[target] += size
        targets.append(target)
    return targets


def group_names(stems: Sequence[str], pattern: str) -> list[str]:
    """The group of each stem: the first match of `pattern` in it (its first capture group, if any)."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise SegkitError(f"--group: {pattern!r} is not a regular expression ({error})") from None
    names = []
    for stem in stems:
        match = regex.search(stem)
        name = (match.group(1) if regex.groups else match.group(0)) if match else None
        if not name:
            raise SegkitError(f"--group: {pattern!r} does not name a group in '{stem}'; "
                              "give a pattern every image stem matches, e.g. '^[^_]+' for the part before '_'")
        names.append(name)
    return names


def assign_groups(groups: Sequence[str], fractions: Sequence[float], seed: int) -> list[int]:
    """The split index of each item when whole groups go, largest first, to the split furthest below its share.

    Equal sizes are taken in an order drawn from `seed`; a split gets no image when there are fewer groups
    than splits (write_splits then says which list would be empty).
    """
    sizes = Counter(groups)
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda name: -sizes[name])  # stable: ties keep the drawn order
    split_of = dict(zip(order, place([sizes[name] for name in order], fractions), strict=True))
    return [split_of[name] for name in groups]


def write_splits(
    stems: Sequence[str],
    out: Path,
    *,
    ratios: Sequence[float] = (0.8, 0.2),
    folds: int = 0,
    seed: int = 0,
    labels: Sequence[frozenset[int]] | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Write the list files; return {relative list path: stems}. With folds, ratios[2] is the test share.

    `labels` (the classes of each stem) stratify; `groups` (the group of each stem) keep each group whole.
    """
    if labels is not None and groups is not None:
        raise SegkitError("--stratify and --group: choose one (whole groups cannot also be spread per class)")

    def split_of(indices: Sequence[int], fractions: Sequence[float], salt: int) -> list[int]:
        if groups is not None:
            return assign_groups([groups[i] for i in indices], fractions, seed + salt)
        return assign([stems[i] for i in indices], fractions, seed + salt,
                      [labels[i] for i in indices] if labels else None)

    if any(r < 0 for r in ratios) or not 1 <= len(ratios) <= 3 or sum(ratios) <= 0:
        raise SegkitError(f"--ratios: need 1 to 3 non-negative shares (train val [test]), got {list(ratios)}")
    lists: dict[str, list[str]] = {}
    if folds:
        if folds < 2:
            raise SegkitError(f"--folds: need at least 2 folds, got {folds}")
        test_share = ratios[2] if len(ratios) == 3 else 0.0
        rest = list(range(len(stems)))
        if test_share > 0:
            side = split_of(rest, [1 - test_share, test_share], 0)
            lists["test.txt"] = [stems[i] for i in range(len(stems)) if side[i] == 1]
            rest = [i for i in range(len(stems)) if side[i] == 0]
        fold_of = split_of(rest, [1.0] * folds, 1)
        for k in range(folds):
            lists[f"fold{k}/train.txt"] = [stems[i] for i, f in zip(rest, fold_of, strict=True) if f != k]
            lists[f"fold{k}/val.txt"] = [stems[i] for i, f in zip(rest, fold_of, strict=True) if f == k]
    else:
        names = ["train.txt", "val.txt", "test.txt"][: len(ratios)]
        side = split_of(range(len(stems)), ratios, 0)
        for s, name in enumerate(names):
            if ratios[s] > 0:
                lists[name] = [stems[i] for i in range(len(stems)) if side[i] == s]
    for name, members in lists.items():
        if not members:
            count = f"{len(stems)} images" + (f" in {len(set(groups))} group(s)" if groups is not None else "")
            raise SegkitError(f"{out / name}: would be empty ({count}); change --ratios or --folds")
    for name, members in lists.items():  # only once every list is known to be good: no half-written set
        write_stem_list(out / name, sorted(members))
    return lists


def run(args: argparse.Namespace) -> dict[str, list[str]]:
    if not args.images.is_dir():
        raise DataError(f"{args.images}: directory not found")
    images, duplicates = files_by_stem(args.images, IMAGE_SUFFIXES)
    if duplicates:
        first = sorted(duplicates)[0]
        raise DataError(f"{duplicates[first][-1]}: duplicate stem '{first}' ({len(duplicates)} such stems)")
    stems = sorted(images)
    labels = None
    if args.masks is not None:
        masks, _ = files_by_stem(args.masks, IMAGE_SUFFIXES)
        missing = [s for s in stems if s not in masks]
        if missing:
            raise DataError(
                f"{images[missing[0]]}: missing mask in {args.masks} ({len(missing)} images without)"
            )
        if args.stratify:
            labels = [mask_classes(masks[s]) for s in stems]
    elif args.stratify:
        raise SegkitError("--stratify: needs --masks")
    if not stems:
        raise DataError(f"{args.images}: empty data set, no images ({', '.join(IMAGE_SUFFIXES)})")
    groups = group_names(stems, args.group) if args.group is not None else None
    out = args.out or args.images.parent / "splits"
    lists = write_splits(stems, out, ratios=args.ratios, folds=args.folds, seed=args.seed, labels=labels,
                         groups=groups)
    group_of = dict(zip(stems, groups, strict=True)) if groups is not None else {}
    for name, members in lists.items():
        line = f"{out / name}: {len(members)} images"
        if group_of:
            names = sorted({group_of[s] for s in members})
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} groups)" if len(names) > 5 else "")
            line += f" from {shown}"
        if labels is not None:
            index = {s: i for i, s in enumerate(stems)}
            present = Counter(c for s in members for c in labels[index[s]])
            line += f"; classes present: {len(present)}/{len({c for item in labels for c in item})}"
        print(line)
    pattern = "fold{fold}/{split}.txt" if args.folds else "{split}.txt"
    fold = " dataset.fold=0" if args.folds else ""
    print(f"use: \"dataset.split_file='{out.resolve() / pattern}'\"{fold}"
          + " with dataset.image_dir / dataset.mask_dir naming the folders without {split}")
    return lists
