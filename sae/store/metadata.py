"""The cache's metadata: group attributes written once at creation, and per-writer commit records.

Commit records are tiny zarr groups `writers/rank-NNNNN` (their own zarr.json), one per writer, so
concurrent writers never rewrite the same object; a plain zarr reader still sees them as groups
with attributes.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from sae.errors import SaeError
from sae.store.layout import FORMAT_NAME, FORMAT_VERSION, WRITERS, Layout, layout_from_attrs
from sae.store.location import Location
from sae.store.stats import RunningStats


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def json_normalise(value: object, what: str) -> dict:
    """Round-trip through JSON so comparisons see what a reader will see (tuples become lists)."""
    if not isinstance(value, dict):
        raise SaeError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise SaeError(f"{what} must be JSON-serialisable: {err}") from None


def root_attrs(
    layout: Layout, identity: dict, config: dict, compression: str | None
) -> dict[str, object]:
    """Group attributes of a new cache; the summary fields are refreshed as writers commit."""
    import sae

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool": "sae",
        "tool_version": sae.__version__,
        "created": now_utc(),
        "identity": identity,
        "config": config,
        **layout.to_attrs(),
        "activation_dtype": "float16",
        "compression": compression,
        "tokens_committed": 0,
        "stats": None,
    }


def check_root(attrs: object, url: str) -> Layout:
    """Validate a cache's group attributes (untrusted input) and return its layout."""
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        raise SaeError(
            f"{url} is not an sae activation cache (no format={FORMAT_NAME!r} attribute); "
            "pass the directory that `sae harvest` wrote"
        )
    version = attrs.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SaeError(f"{url}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise SaeError(
            f"{url} has cache format_version {version}, newer than this sae understands "
            f"({FORMAT_VERSION}); upgrade sae (pip install -U sae)"
        )
    if not isinstance(attrs.get("identity"), dict):
        raise SaeError(f"{url}: the identity attribute is missing or not an object")
    if attrs.get("activation_dtype", "float16") != "float16":
        raise SaeError(f"{url}: activation_dtype {attrs.get('activation_dtype')!r} unsupported")
    return layout_from_attrs(attrs)


def record_key(rank: int) -> str:
    return f"{WRITERS}/rank-{rank:05d}/zarr.json"


@dataclass
class CommitRecord:
    """What one writer has durably committed: rows, their statistics, and the resume point."""

    rank: int
    committed: int
    stats: RunningStats
    resume_rows: int = 0
    resume_state: dict | None = None
    updated: str = ""
    # The writer stopped short of its range for good (its input ran out): the cache's summary
    # may then count it as done.
    finished: bool = False

    def to_json(self, layout: Layout) -> dict:
        start, stop = layout.rank_range(self.rank)
        return {
            "zarr_format": 3,
            "node_type": "group",
            "attributes": {
                "rank": self.rank,
                "world_size": layout.world_size,
                "row_start": start,
                "row_stop": stop,
                "committed": self.committed,
                "stats": self.stats.to_json(),
                "resume": {"rows": self.resume_rows, "state": self.resume_state},
                "finished": self.finished,
                "updated": now_utc(),
            },
        }


def read_record(loc: Location, layout: Layout, rank: int) -> CommitRecord:
    """The commit record of `rank`; a writer that never committed has zero rows."""
    raw = loc.read_json(record_key(rank))
    if raw is None:
        return CommitRecord(rank, 0, RunningStats(layout.d_model))
    attrs = raw.get("attributes")
    where = f"{loc.url}/{record_key(rank)}"
    if not isinstance(attrs, dict):
        raise SaeError(f"{where} has no attributes; the commit record is damaged")
    start, stop = layout.rank_range(rank)
    committed = attrs.get("committed")
    if not isinstance(committed, int) or isinstance(committed, bool):
        raise SaeError(f"{where}: committed={committed!r} is not an integer")
    if not 0 <= committed <= stop - start:
        raise SaeError(
            f"{where}: committed={committed} is outside this writer's {stop - start} rows"
        )
    if attrs.get("row_start") != start or attrs.get("row_stop") != stop:
        raise SaeError(f"{where}: row range does not match the cache layout")
    stats = RunningStats.from_json(attrs.get("stats"), layout.d_model)
    if stats.count != committed:
        raise SaeError(f"{where}: statistics count {stats.count} != committed rows {committed}")
    resume = attrs.get("resume") or {}
    rows = resume.get("rows", 0) if isinstance(resume, dict) else 0
    state = resume.get("state") if isinstance(resume, dict) else None
    if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= committed:
        raise SaeError(f"{where}: resume rows {rows!r} are not within the committed rows")
    if state is not None and not isinstance(state, dict):
        raise SaeError(f"{where}: resume state is not an object")
    finished = attrs.get("finished", False) is True
    return CommitRecord(
        rank, committed, stats, rows, state, str(attrs.get("updated", "")), finished
    )
