"""Reading physical activation rows: memory-mapped shard files when possible, zarr otherwise.

For a local, uncompressed cache the bytes of an inner chunk sit contiguously inside its shard
file (zarr's sharding codec, index at the end), so a chunk is a zero-copy numpy view of a memory
map; its crc32c is checked before use so a corrupted chunk is never returned silently.
"""

from __future__ import annotations

import functools
import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sae.errors import SaeError
from sae.store.layout import ACTIVATIONS, Layout

MAX_U64 = np.uint64(2**64 - 1)


class ChunkCorrupt(SaeError):
    """A chunk failed its checksum (or its shard is truncated)."""


@functools.cache
def _crc32c_impl() -> Any:
    """ICRAR's `crc32c` when installed: it releases the GIL for buffers of 32 KiB and more, so
    reader threads verify chunks while the training thread launches kernels (on an H200 the
    GIL-holding google_crc32c cost end-to-end training 14 % of its tokens/s). Else zarr's own
    dependency, google_crc32c, which holds the GIL. Both compute the same CRC-32C."""
    try:
        from crc32c import crc32c as released

        return released
    except ImportError:
        import google_crc32c

        return google_crc32c.value


def crc32c(data: Any) -> int:
    """CRC-32C (Castagnoli) of a contiguous buffer, as zarr's crc32c codec stores it."""
    return int(_crc32c_impl()(data))


class ZarrRows:
    """Rows through zarr itself (remote stores, compressed caches); checksums checked by zarr.

    zarr reads a shard object that is not there as zeros, so each shard is looked up once (one
    existence check per `shard_rows` rows) before its rows are trusted."""

    def __init__(self, array: Any, shard_rows: int, shard_exists: Callable[[int], bool]) -> None:
        self.array = array
        self.shard_rows, self.shard_exists = shard_rows, shard_exists
        self._present: set[int] = set()

    def read(self, start: int, stop: int) -> np.ndarray:
        if stop > start:
            for shard in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1):
                if shard not in self._present:
                    if not self.shard_exists(shard):
                        raise ChunkCorrupt(
                            f"activation shard {shard} is missing from the cache (its committed "
                            "rows would read as zeros); copy the cache again from its source"
                        )
                    self._present.add(shard)
        try:
            return self.array[start:stop]
        except ValueError as err:
            if "checksum" in str(err):
                raise ChunkCorrupt(f"rows {start}..{stop}: {err}") from None
            raise


class MmapRows:
    """Zero-copy rows of a local uncompressed sharded cache; keeps a few shard maps open."""

    def __init__(self, root: Path, layout: Layout, verify: bool = True, max_open: int = 64) -> None:
        self.dir = root / ACTIVATIONS / "c"
        self.layout = layout
        self.verify = verify
        self.max_open = max_open
        self.inner = layout.shard_rows // layout.chunk_rows
        self._maps: OrderedDict[int, tuple[mmap.mmap, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def _shard(self, s: int) -> tuple[mmap.mmap, np.ndarray]:
        with self._lock:
            hit = self._maps.get(s)
            if hit is not None:
                self._maps.move_to_end(s)
                return hit
        path = self.dir / str(s) / "0"
        try:
            with path.open("rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (FileNotFoundError, ValueError):
            raise ChunkCorrupt(f"shard file {path} is missing or empty") from None
        n_index = self.inner * 16
        if len(mm) < n_index + 4:
            raise ChunkCorrupt(f"shard file {path} is truncated")
        raw = np.frombuffer(mm, np.uint8, n_index + 4, len(mm) - n_index - 4)
        if self.verify and crc32c(raw[:n_index]) != int(raw[n_index:].view("<u4")[0]):
            raise ChunkCorrupt(f"shard {s}: index checksum mismatch ({path})")
        index = raw[:n_index].view("<u8").reshape(self.inner, 2).copy()
        with self._lock:
            self._maps[s] = (mm, index)
            while len(self._maps) > self.max_open:
                self._maps.popitem(last=False)  # the map closes when its last view is gone
        return mm, index

    def chunk(self, c: int, verify: bool | None = None) -> np.ndarray:
        """Inner chunk `c` as a (chunk_rows, d_model) float16 view into the page cache."""
        lay = self.layout
        s, j = divmod(c, self.inner)
        mm, index = self._shard(s)
        offset, nbytes = (int(v) for v in index[j])  # Python ints: a huge offset cannot wrap
        want = lay.chunk_rows * lay.d_model * 2
        if offset == MAX_U64:
            raise ChunkCorrupt(f"chunk {c} is missing from shard {s}")
        if nbytes != want + 4 or offset + nbytes > len(mm):
            raise ChunkCorrupt(f"chunk {c}: index entry ({offset}, {nbytes}) is inconsistent")
        body = np.frombuffer(mm, np.uint8, want + 4, int(offset))
        if self.verify if verify is None else verify:
            stored = int(body[want:].view("<u4")[0])
            if crc32c(body[:want]) != stored:
                raise ChunkCorrupt(
                    f"chunk {c}: checksum mismatch (shard file {self.dir / str(s) / '0'})"
                )
        return body[:want].view("<f2").reshape(lay.chunk_rows, lay.d_model)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop); a view when they lie in one chunk, else a concatenation."""
        cr = self.layout.chunk_rows
        c0, c1 = start // cr, (stop - 1) // cr
        if c0 == c1:
            return self.chunk(c0)[start - c0 * cr : stop - c0 * cr]
        parts = [
            self.chunk(c)[max(start, c * cr) - c * cr : min(stop, (c + 1) * cr) - c * cr]
            for c in range(c0, c1 + 1)
        ]
        return np.concatenate(parts)


def mmap_supported(root: Path | None, array_meta: dict, layout: Layout) -> bool:
    """True when the activations are plain little-endian fp16 + crc32c inside default-keyed shards."""
    if root is None:
        return False
    codecs = array_meta.get("codecs")
    enc = array_meta.get("chunk_key_encoding") or {}
    sep = (enc.get("configuration") or {}).get("separator", "/")
    if (
        enc.get("name") != "default"
        or sep != "/"
        or not isinstance(codecs, list)
        or len(codecs) != 1
    ):
        return False
    shard = codecs[0]
    cfg = shard.get("configuration") or {} if isinstance(shard, dict) else {}
    inner = [c.get("name") for c in cfg.get("codecs", []) if isinstance(c, dict)]
    index = [c.get("name") for c in cfg.get("index_codecs", []) if isinstance(c, dict)]
    endian = [
        (c.get("configuration") or {}).get("endian", "little")
        for c in cfg.get("codecs", []) + cfg.get("index_codecs", [])
        if isinstance(c, dict) and c.get("name") == "bytes"
    ]
    return (
        shard.get("name") == "sharding_indexed"
        and list(cfg.get("chunk_shape", [])) == [layout.chunk_rows, layout.d_model]
        and inner == ["bytes", "crc32c"]
        and index == ["bytes", "crc32c"]
        and cfg.get("index_location", "end") == "end"
        and all(e == "little" for e in endian)
        and array_meta.get("data_type") == "float16"
    )


def write_shard_file(
    root: Path, layout: Layout, shard: int, rows: np.ndarray, *, sync: bool = False
) -> None:
    """Encode one shard exactly as zarr's sharding codec (bytes + crc32c inner chunks, index at the
    end with its own crc32c) and replace the file atomically; sync: flushed to disk before the
    rename, for a rewrite of a shard that already holds committed rows (a new shard is synced by
    the writer after the rename, before any record counts it).

    Used for local uncompressed caches, where it writes at disk speed without zarr's per-chunk
    copies; zarr reads the result like any other shard (tested).
    """
    import os
    import uuid

    cr, d = layout.chunk_rows, layout.d_model
    inner = layout.shard_rows // cr
    chunk_bytes = cr * d * 2
    index = np.full((inner, 2), MAX_U64, dtype="<u8")
    path = root / ACTIVATIONS / "c" / str(shard) / "0"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".0.{uuid.uuid4().hex}.partial")
    data = np.ascontiguousarray(rows, dtype="<f2")
    with tmp.open("wb") as f:
        for j in range(-(-len(data) // cr)):
            part = data[j * cr : (j + 1) * cr]
            if len(part) < cr:  # the last chunk of a tail: pad with the fill value
                part = np.concatenate([part, np.zeros((cr - len(part), d), "<f2")])
            view = part.reshape(-1).view(np.uint8)
            f.write(view)
            f.write(np.uint32(crc32c(view)).astype("<u4").tobytes())
            index[j] = (j * (chunk_bytes + 4), chunk_bytes + 4)
        raw = index.tobytes()
        f.write(raw)
        f.write(np.uint32(crc32c(raw)).astype("<u4").tobytes())
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
