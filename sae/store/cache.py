"""open_cache / Cache: the read side of a cache, over the union of all writers' committed rows.

Committed rows are numbered in one global order: writer 0's committed rows, then writer 1's,
and so on (each writer owns a contiguous physical range and commits a prefix of it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sae.errors import SaeError
from sae.store.layout import ACTIVATIONS, POSITIONS, TOKEN_IDS, Layout
from sae.store.location import Location, locate
from sae.store.metadata import CommitRecord, check_root, read_record
from sae.store.rows import MmapRows, ZarrRows, mmap_supported
from sae.store.stats import RunningStats


def open_cache(url: str, *, verify_reads: bool = True) -> Cache:
    """Open a cache for reading; SaeError if it is not one, is too new, or lacks an array."""
    loc = locate(url)
    if loc.local is not None and not loc.local.is_dir():
        raise SaeError(f"{url} does not exist or is not a directory; pass a cache directory")
    meta = loc.read_json("zarr.json")
    if meta is None:
        raise SaeError(f"{url} is not an sae activation cache (no zarr.json); check the path")
    if meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
        raise SaeError(f"{url} is not a Zarr v3 group, so it is not an sae activation cache")
    attrs = meta.get("attributes")
    layout = check_root(attrs, url)
    return Cache(loc, attrs, layout, verify_reads=verify_reads)


class Cache:
    """A snapshot of a cache's committed rows (re-open to see rows committed later)."""

    def __init__(self, loc: Location, attrs: dict, layout: Layout, *, verify_reads: bool) -> None:
        import zarr

        self.loc = loc
        self.url = loc.url
        self.attrs = attrs
        self.layout = layout
        self.identity: dict = attrs["identity"]
        self.d_model = layout.d_model
        try:
            group = zarr.open_group(loc.store(read_only=True), mode="r")
        except Exception as err:
            raise SaeError(f"cannot open {self.url} as a zarr group: {err}") from None
        self.arrays: dict[str, Any] = {}
        for name, shape, dtype in (
            (ACTIVATIONS, (layout.total_tokens, layout.d_model), "float16"),
            (TOKEN_IDS, (layout.total_tokens,), "int32"),
            (POSITIONS, (layout.total_tokens,), "int32"),
        ):
            try:
                arr = group[name]
            except KeyError:
                raise SaeError(
                    f"{self.url} lacks the {name!r} array; the cache is incomplete"
                ) from None
            except Exception as err:  # bad JSON, an unknown codec: metadata from elsewhere
                raise SaeError(
                    f"{self.url}: cannot open the {name!r} array ({type(err).__name__}: {err}); "
                    "its metadata is damaged or was not written by sae"
                ) from None
            if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
                raise SaeError(
                    f"{self.url}: array {name!r} is {arr.dtype}{tuple(arr.shape)}, expected {dtype}{shape}"
                )
            self.arrays[name] = arr
        grid = self.arrays[ACTIVATIONS]
        want = ((layout.chunk_rows, layout.d_model), (layout.shard_rows, layout.d_model))
        if (tuple(grid.chunks), tuple(grid.shards or ())) != want:
            raise SaeError(
                f"{self.url}: the activations' chunks {tuple(grid.chunks)} and shards "
                f"{grid.shards} are not the {want[0]} and {want[1]} its attributes give; "
                "the metadata is damaged"
            )
        self.records: list[CommitRecord] = [
            read_record(loc, layout, r) for r in range(layout.world_size)
        ]
        self.committed = [r.committed for r in self.records]
        self.segments = self._segments(self.committed)
        self.n_tokens = sum(self.committed)
        act_meta = loc.read_json(f"{ACTIVATIONS}/zarr.json") or {}
        self.zero_copy = mmap_supported(loc.local, act_meta, layout)
        self.rows = (
            MmapRows(loc.local, layout, verify=verify_reads)
            if self.zero_copy and loc.local is not None
            else ZarrRows(
                self.arrays[ACTIVATIONS],
                layout.shard_rows,
                self.shard_exists,
            )
        )
        self._bos_cache: dict[tuple[int, ...], np.ndarray] = {}

    def shard_exists(self, shard: int) -> bool:
        """Whether activation shard `shard` (rows shard·shard_rows …) is in the store."""
        return self.loc.exists(f"{ACTIVATIONS}/c/{shard}/0")

    def _segments(self, committed: list[int]) -> list[tuple[int, int, int]]:
        """(global start, physical start, length) for each writer with committed rows."""
        out, g = [], 0
        for rank, n in enumerate(committed):
            if n:
                out.append((g, self.layout.rank_range(rank)[0], n))
                g += n
        return out

    # --- description -------------------------------------------------------------------------
    def _identity(self, key: str, kind: type) -> Any:
        value = self.identity.get(key)
        if value is not None and not isinstance(value, kind):
            raise SaeError(f"{self.url}: identity {key}={value!r} is not a {kind.__name__}")
        return value

    @property
    def model(self) -> str:
        return self._identity("model", str)

    @property
    def layer(self) -> int:
        return self._identity("layer", int)

    @property
    def hook(self) -> str:
        return self._identity("hook", str)

    @property
    def context(self) -> int:
        return self._identity("context", int)

    @property
    def stats(self) -> dict:
        total = RunningStats(self.d_model)
        for r in self.records:
            total.merge(r.stats)
        return total.summary()

    @property
    def heldout_rows(self) -> tuple[int, int]:
        """[0, H): the first ~1% of writer 0's rows (they are written first, so they never move)."""
        return 0, min(self.layout.heldout_rows, self.committed[0])

    # --- rows in global committed order --------------------------------------------------------
    def physical(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Physical row ranges behind global committed rows [start, stop)."""
        if not (
            isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= self.n_tokens
        ):
            raise SaeError(f"rows [{start}, {stop}) are outside the cache's {self.n_tokens} rows")
        out = []
        for g, p, n in self.segments:
            lo, hi = max(start, g), min(stop, g + n)
            if lo < hi:
                out.append((p + lo - g, p + hi - g))
        return out

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        parts = [np.asarray(self.rows.read(a, b)) for a, b in self.physical(start, stop)]
        if not parts:
            return np.empty((0, self.d_model), np.float16)
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def _ints(self, name: str, start: int, stop: int) -> np.ndarray:
        arr = self.arrays[name]
        parts = [arr[a:b] for a, b in self.physical(start, stop)]
        return np.concatenate(parts) if parts else np.empty(0, np.int32)

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        return self._ints(TOKEN_IDS, start, stop)

    def positions(self, start: int, stop: int) -> np.ndarray:
        return self._ints(POSITIONS, start, stop)

    def bos_rows(self, committed: list[int] | None = None) -> np.ndarray:
        """Sorted physical rows whose position is 0, over the committed rows (read once, cached)."""
        committed = list(committed or self.committed)
        key = tuple(committed)
        if key not in self._bos_cache:
            arr = self.arrays[POSITIONS]
            step = self.layout.token_chunk_rows
            found = []
            for rank, n in enumerate(committed):
                p0 = self.layout.rank_range(rank)[0]
                for a in range(p0, p0 + n, step):
                    pos = arr[a : min(a + step, p0 + n)]
                    found.append(np.flatnonzero(pos == 0) + a)
            self._bos_cache[key] = np.concatenate(found) if found else np.empty(0, np.int64)
        return self._bos_cache[key]

    # --- streaming ----------------------------------------------------------------------------
    def batches(self, batch_size: int, **kwargs: Any) -> Any:
        """A shuffled, resumable stream of (batch_size, d_model) tensors; see BatchStream."""
        from sae.store.stream import BatchStream

        return BatchStream(self, batch_size, **kwargs)

    def sample(self, n: int, *, seed: int = 0, split: str = "train", keep_bos: bool = False) -> Any:
        """n random rows of a split as float32 (for initialisation, e.g. the decoder bias)."""
        import torch

        stream = self.batches(
            n,
            seed=seed,
            split=split,
            keep_bos=keep_bos,
            drop_last=False,
            dtype=torch.float32,
            epochs=1,
        )
        try:
            batch = next(iter(stream), None)
        finally:
            stream.close()
        if batch is None or batch.shape[0] < n:
            have = 0 if batch is None else batch.shape[0]
            raise SaeError(f"asked for {n} rows of split {split!r}, but the cache has only {have}")
        return batch
