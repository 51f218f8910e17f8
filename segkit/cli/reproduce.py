"""`segkit-reproduce RUN_DIR [overrides]`: train again from a run's saved `.hydra/config.yaml`.

The same as `python train.py --config-dir RUN_DIR/.hydra --config-name config`: the config the
run composed (after its overrides), not today's conf/ defaults. The new run goes to
`RUN_DIR/reproductions/<time>` (or `--out`); then its final metrics are compared with the
original's. With `trainer.deterministic=true` on CPU they are identical; `--check` exits 1 if not.
Relative paths in the config (dataset.root) resolve against the current directory, as before.

The run directory may come from someone else: before anything is built, its config is checked
(segkit/engine/trusted.py): only allowlisted segkit / torch / kornia / smp parts, no paths outside the
working directory to write to, no server to send to. `--trust` skips the check for a run you trust;
the overrides you pass are yours and are not refused.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_PLAIN = re.compile(r"^[\w/.\-]+$")


def hydra_value(text: str) -> str:
    """Quote a value for Hydra's override grammar when it holds anything but plain path characters."""
    if _PLAIN.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compare(original: dict[str, Any], again: dict[str, Any]) -> list[str]:
    """Keys of the run summary whose values differ (final/best metrics, steps, status)."""
    keys = ("status", "steps", "epochs", "best_score", "best_epoch", "final", "best")
    return [key for key in keys if _canonical(original.get(key)) != _canonical(again.get(key))]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segkit-reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run or sweep-job directory (holds .hydra/)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.accelerator=cpu")
    parser.add_argument("--out", type=Path, help="new run directory (default: RUN_DIR/reproductions/<time>)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the final metrics are identical")
    parser.add_argument("--trust", action="store_true",
                        help="build whatever the run's config names (only for a run directory you trust)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        print(f"error: {config}: not found (is {args.run_dir} a run directory?)", file=sys.stderr)
        return 2
    if not args.trust:
        from segkit.engine.trusted import check_run_config
        from segkit.errors import SegkitError

        try:
            check_run_config(str(config), args.overrides)
        except SegkitError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    out = (args.out or run_dir / "reproductions" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    train(config.parent, [f"hydra.run.dir={hydra_value(str(out))}", "hydra.job.name=train", *args.overrides])

    original, again = run_dir / "metrics.json", out / "metrics.json"
    if not (original.is_file() and again.is_file()):
        print(f"reproduced into {out} (no metrics.json to compare)")
        return 1 if args.check else 0
    differ = compare(json.loads(original.read_text()), json.loads(again.read_text()))
    if differ:
        print(f"reproduced into {out}: differs from {run_dir} in {', '.join(differ)}")
        return 1 if args.check else 0
    print(f"reproduced into {out}: final metrics identical to {run_dir}")
    return 0


def train(config_dir: Path, overrides: Sequence[str]) -> None:
    """Run the Hydra app in this process with the saved config as its primary config."""
    from segkit.cli.train import main as train_main

    saved = sys.argv
    sys.argv = [saved[0], "--config-dir", str(config_dir), "--config-name", "config", *overrides]
    try:
        train_main()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
