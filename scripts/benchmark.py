"""Training, evaluation and data throughput side by side; the tables are appended to docs/benchmarks.md.

    python scripts/benchmark.py all                                   # synthetic set, the default config
    python scripts/benchmark.py train dataset=camvid dataset.root=../shared/datasets/camvid \\
        model=deeplabv3plus backbone=resnet50 trainer=gpu dataset.cache=device
    python scripts/benchmark.py data --windows 7 dataset.image_size=[512,512]

<what> is train (ceiling / segkit / reference pipeline), eval (whole image / sliding window),
data (decode + collate / + augmentation on the device / reference CPU augmentation) or all;
precision (the ceiling step in fp32 and bf16 autocast, each with and without channels_last); or
side-by-side: --trainings whole trainings of the overrides started at once, with the default CPU
threads and with every core each:
    python scripts/benchmark.py side-by-side experiment=camvid_cpu_unet \\
        dataset.root=../shared/datasets/camvid trainer.max_steps=30 trainer.log_every_n_steps=10
The config is train.yaml with augmentation=default and logger=none in front of your overrides.
See segkit/benchmark.py for how windows are timed and interleaved.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from segkit import safe_files  # noqa: E402
from segkit.benchmark import EXTRA_SECTIONS, SECTIONS, append, run, side_by_side  # noqa: E402
from segkit.cli.common import register_configs  # noqa: E402
from segkit.errors import SegkitError  # noqa: E402

DEFAULTS = ["augmentation=default", "logger=none", "trainer.progress_bar=false"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=[*SECTIONS, *EXTRA_SECTIONS, "all", "side-by-side"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=camvid dataset.root=...")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per variant (median reported)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first window")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--trainings", type=int, default=2, help="side-by-side: trainings started at once")
    parser.add_argument("--rounds", type=int, default=2, help="side-by-side: rounds of each variant")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md", help="file to append to")
    args = parser.parse_intermixed_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # on a small loaded CPU, one thread beats two contending ones
    command = "python scripts/benchmark.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.what == "side-by-side":
        with tempfile.TemporaryDirectory(prefix="segkit-side-by-side-") as workdir:
            text = side_by_side(args.overrides, command, Path(workdir), trainings=args.trainings, rounds=args.rounds)
        print(text)
        with safe_files.open_append(args.output) as handle:
            handle.write("\n" + text)
        return 0
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "segkit" / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*DEFAULTS, *args.overrides])
    sections = SECTIONS if args.what == "all" else (args.what,)
    try:
        report = run(cfg, sections, command, windows=args.windows, steps=args.steps, warmup=args.warmup)
    except SegkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(append(report, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
