"""The one-paragraph summary a harvest prints when it ends."""

from __future__ import annotations

from sae.harvest.pipeline import HarvestReport
from sae.progress import console
from sae.units import format_count


def print_report(report: HarvestReport) -> None:
    who = "" if report.world_size == 1 else f"rank {report.rank}/{report.world_size}: "
    new = report.committed - report.resumed_from
    rate = new / report.seconds if report.seconds > 0 else 0.0
    resumed = f" (resumed at {format_count(report.resumed_from)})" if report.resumed_from else ""
    console.print(
        f"{who}{format_count(report.committed)} tokens in {report.url}{resumed}; "
        f"{format_count(new)} new in {report.seconds:.1f} s ({format_count(int(rate))} tok/s)"
    )
    if report.exhausted:
        console.print(
            f"[yellow]{who}the dataset ran out: wrote {report.committed} of the "
            f"{report.target} tokens asked for; the cache is valid with what was written[/yellow]"
        )
