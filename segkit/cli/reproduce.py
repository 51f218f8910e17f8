"""`segkit-reproduce RUN_DIR [overrides]`: train again from a run's saved `.hydra/config.yaml`.

The config the run composed (after its overrides), not today's conf/ defaults (segkit.engine.reproduce).
The new run goes to `--out` (default `outputs/reproductions/<run>_<time>` below the current directory,
never inside RUN_DIR); then its final metrics are compared with the original's. With
`trainer.deterministic=true` on CPU they are identical; `--check` exits 1 if not.

The run directory may come from someone else: its config is parsed as data into segkit's training
schema and checked (segkit/runs/trusted.py), never composed by Hydra: only allowlisted segkit / torch /
kornia / smp parts, no Hydra settings, `# @package` header, resolver (`${oc.env:...}`) or unknown key,
sizes within limits, no server to send to; where training writes comes from your command line.
`--trust` composes it with Hydra as written, for a run you trust; the overrides you pass are yours and
are not refused.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from segkit.errors import SegkitError, one_line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segkit-reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run or sweep-job directory (holds .hydra/)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.accelerator=cpu")
    parser.add_argument("--out", type=Path, help="new run directory (default: outputs/reproductions/<run>_<time>)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the final metrics are identical")
    parser.add_argument("--trust", action="store_true",
                        help="compose the run's config with Hydra as written (only for a run directory you trust)")
    args = parser.parse_args(argv)
    from segkit.engine.reproduce import reproduce  # after parsing: --help answers without torch

    try:
        result = reproduce(args.run_dir, args.overrides, args.out, trust=args.trust)
    except (SegkitError, HydraException, OmegaConfBaseException) as error:  # no run there, a config refused,
        print(f"error: {one_line(error)}", file=sys.stderr)                # a bad override
        return 2
    out, original = result.run.path, args.run_dir.resolve()
    if result.differ is None:
        print(f"reproduced into {out} (no metrics.json to compare)")
        return 1 if args.check else 0
    if result.differ:
        print(f"reproduced into {out}: differs from {original} in {', '.join(result.differ)}")
        return 1 if args.check else 0
    print(f"reproduced into {out}: final metrics identical to {original}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
