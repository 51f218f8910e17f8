"""`segkit-split`: write train/val(/test) split lists for a folder data set (segkit.tools.split)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from segkit.cli.common import run_or_exit


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segkit-split", description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path, help="directory of images (all splits together)")
    parser.add_argument("--masks", type=Path, help="masks matched by stem (needed for --stratify)")
    parser.add_argument("--out", type=Path, help="where list files go (default: <images>/../splits)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.2], help="train val [test] shares")
    parser.add_argument("--folds", type=int, default=0, help="k-fold lists fold{k}/{train,val}.txt")
    parser.add_argument("--stratify", action="store_true", help="spread every class over the splits")
    parser.add_argument("--group", metavar="REGEX",
                        help="keep images whose stems share REGEX's match (e.g. a video sequence) in one split")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from segkit.tools.split import run  # after parsing: --help answers without loading the image stack

    run_or_exit(lambda: run(args))


if __name__ == "__main__":
    main()
