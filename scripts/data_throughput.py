"""Decode + batch throughput of a data set through the training DataLoader, per epoch.

    python scripts/data_throughput.py --epochs 3 dataset=camvid dataset.root=../shared/datasets/camvid
    python scripts/data_throughput.py --epochs 3 dataset=camvid dataset.root=... dataset.cache=true

Uses the trainer's own loader (shuffled EpochSampler, persistent workers), no model, so the
number is what the data side can feed. With dataset.cache=true each worker keeps what *it*
has read; batches go to workers in turn, so a shuffled epoch 2 hits only part of each
worker's cache, and the rate rises over epochs until every worker holds the whole split.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hydra import compose, initialize_config_dir  # noqa: E402

from segkit.cli.common import register_configs  # noqa: E402
from segkit.data.loading import EpochSampler, build_dataset, build_loader  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "segkit" / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--split", default="train")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=camvid dataset.root=...")
    args = parser.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    dataset = build_dataset(cfg.dataset, args.split)
    loader = build_loader(dataset, batch_size=args.batch_size, num_workers=args.workers, train=True,
                          seed=0, pin_memory=False)
    print(f"{cfg.dataset.name} {args.split}: {len(dataset)} samples at {list(cfg.dataset.image_size)}, "
          f"batch {args.batch_size}, {args.workers} workers, cache={cfg.dataset.get('cache', False)}")
    sampler = loader.sampler
    assert isinstance(sampler, EpochSampler)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for batch, _ in loader:
            images += batch.shape[0]
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch}: {images} images in {elapsed:.2f} s = {images / elapsed:.1f} images/s")


if __name__ == "__main__":
    main()
