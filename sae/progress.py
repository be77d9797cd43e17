"""One rich progress bar style for every long job: done/total, rate, ETA, and live extra fields."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from sae.units import format_count

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, in human units (e.g. '41.2K tok/s')."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"-- {self.unit}/s", style="progress.data.speed")
        return Text(f"{format_count(int(speed))} {self.unit}/s", style="progress.data.speed")


def make_progress(unit: str = "tok", *, extra: str = "") -> Progress:
    """A progress bar with count, rate and ETA; `extra` is a format string over task fields.

    Example: ``make_progress("tok", extra="loss {task.fields[loss]:.3f}")``.
    """
    columns: list[ProgressColumn | str] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    if extra:
        columns.append(TextColumn(extra))
    return Progress(*columns, console=console)
