"""`train.py` with kill points, for the kill campaign (tests/faults/kill_campaign.py).

With SEGKIT_PAUSE_AT=<event> and SEGKIT_MARKS=<dir>, each process touches `<dir>/<event>.<rank>` when it
reaches the event and pauses there SEGKIT_PAUSE_S seconds, so that a kill lands inside it:
- `validation`: at every validation batch, after the metrics took it in (a partial confusion matrix);
- `checkpoint_write`: between the two renames that replace last.pt (the new checkpoint complete in its
  temporary file, the old one already moved to last.prev.pt: last.pt does not exist at that moment).
Without SEGKIT_PAUSE_AT it is train.py: the pauses change no number, only when things happen.
"""

from __future__ import annotations

import os
import time
import types
from pathlib import Path

from segkit import safe_files
from segkit.cli.train import main
from segkit.metrics import SegmentationMetrics
from segkit.runs import checkpoint


def mark(event: str) -> None:
    if os.environ.get("SEGKIT_PAUSE_AT") != event:
        return
    (Path(os.environ["SEGKIT_MARKS"]) / f"{event}.{os.environ.get('RANK', '0')}").touch()
    time.sleep(float(os.environ.get("SEGKIT_PAUSE_S", "1")))


def install_kill_points() -> None:
    update = SegmentationMetrics.update

    def update_then_mark(self, *args, **kwargs):
        update(self, *args, **kwargs)
        mark("validation")

    def replace(src, dst, **dir_fds):
        if Path(dst).name == "last.pt" and Path(src).name.endswith(".tmp"):
            mark("checkpoint_write")
        os.replace(src, dst, **dir_fds)

    SegmentationMetrics.update = update_then_mark  # type: ignore[method-assign]
    # checkpoint.py's own view of `os`, with replace() marked; every other name is the real module's.
    # The final rename happens in safe_files (on the directory's descriptor), the one before it in checkpoint.py.
    checkpoint.os = types.SimpleNamespace(**{**vars(os), "replace": replace})  # type: ignore[assignment]
    safe_files.os = types.SimpleNamespace(**{**vars(os), "replace": replace})  # type: ignore[assignment]


if __name__ == "__main__":
    install_kill_points()
    main()
