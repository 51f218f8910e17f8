"""A rich progress bar that shows the last logged stats; silent when disabled."""

from __future__ import annotations

from collections.abc import Mapping

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            self.bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                transient=True,
            )
            self.task = self.bar.add_task(description, total=total, stats="")
            self.bar.start()

    def advance(self, count: int) -> None:
        if self.bar is not None and count:
            self.bar.advance(self.task, count)

    def show(self, stats: Mapping[str, float]) -> None:
        if self.bar is not None:
            text = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in stats.items())
            self.bar.update(self.task, stats=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
