"""`segkit-predict checkpoint=best.pt input=<file|dir|glob> output=<dir>`: masks for new images.

Every image is brought to the training scale, predicted as the model was trained (whole, or sliding
windows for crop-trained models unless trainer.inference_mode=whole), and its scores are resized back to
the image's own size: the masks are at the input's resolution (segkit/data/geometry.py). A file that
cannot be read is reported on one line and skipped; the exit status is 1 if any file failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from segkit.cli.common import hydra_main, run_or_exit


def run(cfg: DictConfig) -> int:
    """Predict every input; returns the number of files that failed."""
    from segkit.engine.run_lock import guard_run_dir
    from segkit.inference.files import predict_into

    out = Path(cfg.output).expanduser()
    with guard_run_dir(out, "prediction"):  # no other live process writes into the same run directory
        return predict_into(out, cfg)


@hydra_main("predict")
def main(cfg: DictConfig) -> None:
    failed = run_or_exit(lambda: run(cfg))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
