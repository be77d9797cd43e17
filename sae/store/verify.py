"""Re-read every committed chunk of a cache and check checksums and metadata consistency."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sae.errors import SaeError
from sae.store.cache import Cache
from sae.store.layout import POSITIONS, TOKEN_IDS
from sae.store.rows import MmapRows


@dataclass
class VerifyReport:
    """What `sae store verify` found: corrupted activation chunks by index, and other problems."""

    chunks_checked: int = 0
    corrupted: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupted and not self.problems


def committed_chunks(cache: Cache) -> list[int]:
    """Physical inner-chunk indices that hold committed rows."""
    cr = cache.layout.chunk_rows
    out: list[int] = []
    for _, p, n in cache.segments:
        out.extend(range(p // cr, (p + n - 1) // cr + 1))
    return out


def verify_cache(cache: Cache, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every committed chunk's crc32c (activations, token ids, positions) and the metadata."""
    report = VerifyReport()
    lay = cache.layout
    rows = MmapRows(cache.loc.local, lay, verify=True) if cache.zero_copy else None
    acts = cache.arrays["activations"]
    cr = lay.chunk_rows
    chunks = committed_chunks(cache)
    # zarr reads a missing shard object as its fill value (zeros): look for each one first
    # (the memory-mapped path fails on a missing file by itself)
    shards = sorted({c * cr // lay.shard_rows for c in chunks})
    missing = set() if rows is not None else {s for s in shards if not cache.shard_exists(s)}
    for shard in sorted(missing):
        report.problems.append(
            f"activations shard {shard} is missing: its committed rows would read as zeros; "
            "copy the cache again from its source"
        )
    for c in chunks:
        if c * cr // lay.shard_rows in missing:
            report.corrupted.append(c)
            report.chunks_checked += 1
            continue
        try:
            if rows is not None:
                rows.chunk(c)
            else:
                acts[c * cr : min((c + 1) * cr, lay.total_tokens)]
        except (SaeError, ValueError, OSError) as err:
            report.corrupted.append(c)
            report.problems.append(f"activations chunk {c}: {err}")
        report.chunks_checked += 1
        if progress is not None:
            progress(1)
    context = cache.identity.get("context")
    for name in (TOKEN_IDS, POSITIONS):
        arr = cache.arrays[name]
        step = arr.chunks[0]
        for _, p, n in cache.segments:
            for a in range(p // step * step, p + n, step):
                try:
                    values = arr[max(a, p) : min(a + step, p + n)]
                except (ValueError, OSError) as err:
                    report.problems.append(f"{name} chunk {a // step}: {err}")
                    continue
                if np.any(values < 0):
                    report.problems.append(
                        f"{name} chunk {a // step}: negative values in committed rows"
                    )
                if name == POSITIONS and isinstance(context, int) and np.any(values >= context):
                    report.problems.append(
                        f"positions chunk {a // step}: values >= context {context}"
                    )
    stats = cache.stats
    if stats["count"] != cache.n_tokens:
        report.problems.append(
            f"statistics cover {stats['count']} rows, {cache.n_tokens} committed"
        )
    summary = cache.attrs.get("tokens_committed")
    if not isinstance(summary, int) or summary > cache.n_tokens:
        report.problems.append(
            f"group attribute tokens_committed={summary!r} exceeds the writers' {cache.n_tokens}"
        )
    return report
