"""Peak resident memory of a validation pass, for a validation set n times the training set's size.

    python scripts/validation_memory.py                      # 1x and 10x, U-Net / ResNet-18 at 128x128
    python scripts/validation_memory.py --sizes 64 640 --image-size 256

Each size runs in a fresh process (peak RSS is per process): it builds the trainer, records
`ru_maxrss`, runs `Trainer.validate()` on the synthetic set and records it again. A bounded
validation grows by one batch plus the confusion matrix, whatever the number of images.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(val_size: int, image_size: int, batch_size: int) -> dict[str, float]:
    """Runs in the child process."""
    import torch
    from hydra import compose, initialize_config_dir

    from segkit.cli.common import register_configs
    from segkit.engine.trainer import Trainer

    register_configs()
    overrides = [
        f"dataset.image_size=[{image_size},{image_size}]", "dataset.train_size=64", f"dataset.val_size={val_size}",
        f"trainer.batch_size={batch_size}", "trainer.num_workers=0", "trainer.progress_bar=false", "logger=none",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "segkit" / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, Path(out))
        before = peak_rss_mib()
        miou = trainer.validate()["miou"]
    return {"val_images": val_size, "peak_before_mib": before, "peak_after_mib": peak_rss_mib(), "miou": miou}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 640], help="validation set sizes")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.image_size, args.batch_size)))
        return
    print("| validation images | peak RSS before validate (MiB) | peak RSS after (MiB) | growth (MiB) |")
    print("|---|---|---|---|")
    for size in args.sizes:
        command = [sys.executable, __file__, "--child", str(size), "--image-size", str(args.image_size),
                   "--batch-size", str(args.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        growth = row["peak_after_mib"] - row["peak_before_mib"]
        print(f"| {size} | {row['peak_before_mib']:.0f} | {row['peak_after_mib']:.0f} | {growth:.1f} |")


if __name__ == "__main__":
    main()
