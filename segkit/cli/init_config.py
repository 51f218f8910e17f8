"""`segkit-init-config ROOT [--name NAME]`: look at a data set and write ./conf/dataset/<name>.yaml for it.

It recognises the layout (folder, camvid-like, voc, cityscapes with label or train ids, coco,
and the benchmark layouts of ADE20K and COCO-Stuff 164k, which take their preset's classes and
id convention), reads a sample of
masks for the class count, ignore value, remap or colour table, reads image headers for
the size, writes split lists when everything is in one folder, then builds the new config's
reader and reads samples through it, so the file it leaves behind trains as it is:
`segkit-train dataset=<name>` from the same directory (its ./conf layers over segkit's own configs).
Check the class names it could not know.
"""

from __future__ import annotations

import argparse
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import OmegaConf

from segkit import registry, safe_files
from segkit.cli.common import run_or_exit
from segkit.errors import ConfigError, SegkitError

if TYPE_CHECKING:  # the data tools (torch, PIL) are imported where they are used, so --help answers at once
    from segkit.tools.checks import SplitReport
    from segkit.tools.layout import Layout

# The user's config directory, relative to where the command runs: every segkit command run there reads it
# on top of segkit's own tree (hydra_plugins/segkit_conf). Never the installed package's segkit/conf.
USER_DATASETS = Path("conf") / "dataset"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segkit-init-config", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the data set's directory")
    parser.add_argument("--name", help="config name (default: the directory's name)")
    parser.add_argument("--out", type=Path, default=USER_DATASETS,
                        help="where the YAML goes (default: ./conf/dataset, read by segkit commands run here)")
    parser.add_argument("--splits-dir", type=Path, help="list files for a single-folder data set "
                        "(default: <root>/splits, or ./splits/<name> when the root is read-only)")
    parser.add_argument("--val-ratio", type=float, default=0.2, help="validation share when splitting")
    parser.add_argument("--sample", type=int, default=200, help="masks/images read for statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing config")
    return parser.parse_args(argv)


def config_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    return name or "dataset"


def propose(layout: Layout, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The dataset keys of the new config."""
    from segkit.tools.layout import image_sizes, label_settings, spread, summarize_masks

    settings: dict[str, Any] = {"name": name, "root": str(layout.root.resolve()), **layout.settings}
    if layout.schema == "folder" and not layout.preset:
        labels, notes = label_settings(summarize_masks(spread(layout.masks, args.sample)))
        layout.notes += notes
        settings.update(labels)
        if layout.needs_split:
            settings["split_file"] = write_split_lists(layout, args, name)
    sizes = image_sizes(spread(layout.images, args.sample))
    if not sizes:
        raise SegkitError(f"{layout.root}: no training images found")
    (height, width), count = sizes.most_common(1)[0]
    if len(sizes) > 1:
        total = sum(sizes.values())
        layout.notes.append(f"{len(sizes)} image sizes; most common {height}x{width} ({count} of {total})")
        if len({h > w for h, w in sizes}) > 1:  # portrait and landscape: a square wastes least
            height = width = max(height, width)
    settings.setdefault("image_size", fit_size(height, width))  # a benchmark preset keeps its own
    return settings


def fit_size(height: int, width: int, longest: int = 1024, multiple: int = 32) -> list[int]:
    """The letterbox size: the common image size, or scaled down to `longest` and rounded to `multiple`."""
    if max(height, width) <= longest:
        return [height, width]
    scale = longest / max(height, width)
    return [max(multiple, round(side * scale / multiple) * multiple) for side in (height, width)]


def write_split_lists(layout: Layout, args: argparse.Namespace, name: str) -> str:
    from segkit.tools.split import write_splits

    directory = args.splits_dir
    if directory is None:
        writable = layout.root.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
        directory = layout.root / "splits" if writable else Path.cwd() / "splits" / name
    stems = [path.stem for path in layout.images]
    write_splits(stems, directory, ratios=(1 - args.val_ratio, args.val_ratio), seed=args.seed)
    layout.notes.append(f"one folder for all images: wrote {directory}/train.txt and val.txt "
                        f"({1 - args.val_ratio:.0%}/{args.val_ratio:.0%}, seed {args.seed}; "
                        "see segkit-split)")
    path = directory.resolve() / "{split}.txt"
    try:
        return str(path.relative_to(layout.root.resolve()))
    except ValueError:
        return str(path)


def render_yaml(layout: Layout, settings: dict[str, Any]) -> str:
    header = [f"# {layout.kind} layout at {settings['root']}, written by segkit-init-config.",
              f"#   python train.py dataset={settings['name']}"]
    header += [f"# {note}" for note in layout.notes]
    body = yaml.safe_dump(settings, sort_keys=False, default_flow_style=None, width=110)
    defaults = f"defaults:\n  - {layout.schema}_schema\n  - _self_\n\n"
    return "\n".join(header) + "\n" + defaults + body


def load_dataset_config(layout: Layout, text: str) -> Any:
    """The written YAML on its schema, as `dataset=<name>` composes it."""
    body = yaml.safe_load(text)
    body.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(registry.dataset_formats()[layout.schema].schema), body)


def sample_report(cfg: Any, split: str, count: int) -> tuple[SplitReport, int]:
    """Checks and statistics over at most `count` evenly spaced samples; also the split's size."""
    import numpy as np

    from segkit.config import build
    from segkit.tools.checks import SplitReport, check_sample
    from segkit.tools.layout import spread

    report = SplitReport(split)
    dataset = build(cfg, "dataset", split=split)
    indices = spread(range(len(dataset)), count)
    report.dataset, report.samples = dataset, len(indices)
    report.pixel_counts = np.zeros(dataset.num_classes, dtype=np.int64)
    report.presence = np.zeros(dataset.num_classes, dtype=np.int64)
    for index in indices:
        report.problems += check_sample(dataset, index, report)
    return report, len(dataset)


def suggestions(image_size: Sequence[int]) -> str:
    crop = [max(32, min(512, side) // 32 * 32) for side in image_size]
    pixels = crop[0] * crop[1]
    batch = 16 if pixels <= 256 * 256 else 8 if pixels <= 512 * 512 else 4
    return f"suggested: augmentation.crop_size=[{crop[0]},{crop[1]}] trainer.batch_size={batch}"


def run(args: argparse.Namespace) -> Path:
    from segkit.tools.checks import summary_lines
    from segkit.tools.layout import detect_layout

    layout = detect_layout(args.root.expanduser())
    name = config_name(args.name or layout.root.name)
    target = args.out / f"{name}.yaml"
    if target.exists() and not args.force:
        raise ConfigError("--name", f"{target} exists; pick another --name or pass --force")
    settings = propose(layout, args, name)
    text = render_yaml(layout, settings)
    cfg = load_dataset_config(layout, text)
    reports = [sample_report(cfg, split, args.sample) for split in ("train", "val")]
    target.parent.mkdir(parents=True, exist_ok=True)
    safe_files.write_text(target, text)  # never through a planted link
    print(f"layout: {layout.kind}; wrote {target}")
    for note in layout.notes:
        print(f"  {note}")
    for report, total in reports:
        print("\n".join(summary_lines(report)))
        if total > report.samples:
            print(f"  (from {report.samples} evenly spaced of {total} samples; "
                  "segkit-check-data reads them all)")
        for problem in report.problems:
            print(f"  problem: {problem}")
    print(suggestions(settings["image_size"]))
    print(f"check everything: segkit-check-data dataset={name}   train: python train.py dataset={name}")
    return target


def main(argv: Sequence[str] | None = None) -> None:
    run_or_exit(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
