"""BatchStream: shuffled, resumable, rank-partitioned batches of cached activations.

One epoch = a seeded permutation of the split's chunks; rank r takes every world_size-th chunk
(so ranks are disjoint and together complete). Consecutive chunks of a rank are grouped into
windows of about `shuffle_rows` rows; a window is loaded (chunks read in parallel, zero-copy views
when the cache allows), its kept rows (position-0 rows dropped unless keep_bos) are permuted with a
seed derived from (seed, epoch, rank, window) and cut into batches. The stream is thus a pure
function of its parameters, and a cursor (epoch, rows consumed) restarts it exactly.

Threads: a loader thread fills the next window while a batcher thread gathers rows of the current
one into (pinned, when CUDA) batch buffers and copies them to the device on a side stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sae.errors import SaeError

CURSOR_VERSION = 1
DEFAULT_SHUFFLE_BYTES = 1 << 30
_DONE = object()


def cache_digest(cache: Any) -> str:
    """A short fingerprint of what a cache holds (its identity and size, not its URL: a moved
    or copied cache keeps it), so a cursor is never resumed on another cache of the same shape."""
    what = {"identity": cache.identity, "total_tokens": int(cache.layout.total_tokens)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Failure:
    def __init__(self, err: BaseException) -> None:
        self.err = err


class _Prefetch:
    """Run a generator in a thread, `depth` items ahead; close() stops it promptly."""

    def __init__(self, gen: Iterator[Any], depth: int, name: str) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._gen = gen
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._gen:
                if not self._put(item):
                    break
            else:
                self._put(_DONE)
        except BaseException as err:
            self._put(_Failure(err))
        finally:
            close = getattr(self._gen, "close", None)
            if close is not None:
                close()  # runs the generator's finally (stops the threads it started)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.err
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class BatchStream:
    """Iterate to get (batch_size, d_model) tensors; `cursor()` says where to restart."""

    def __init__(
        self,
        cache: Any,
        batch_size: int,
        *,
        split: str = "train",
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
        keep_bos: bool = False,
        shuffle: bool = True,
        epochs: int | None = 1,
        cursor: dict | None = None,
        drop_last: bool = True,
        shuffle_rows: int | None = None,
        workers: int | None = None,
        prefetch: int = 4,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise SaeError(f"batch_size must be a positive integer, got {batch_size!r}")
        if split not in ("train", "heldout"):
            raise SaeError(f"split must be 'train' or 'heldout', got {split!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise SaeError(f"rank {rank!r} must be in [0, world_size={world_size!r})")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise SaeError(f"epochs must be a positive integer or None, got {epochs!r}")
        self.cache = cache
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.epochs = epochs
        self.drop_last = drop_last
        d = cache.d_model
        self.params = {
            "split": split,
            "seed": int(seed),
            "rank": rank,
            "world_size": world_size,
            "keep_bos": bool(keep_bos),
            "shuffle": bool(shuffle),
            "batch_size": batch_size,
            "cache": cache_digest(cache),
        }
        committed = list(cache.committed)
        self._epoch, self._rows = 0, 0
        if cursor is not None:
            committed = self._check_cursor(cursor)
        self._committed = committed
        if shuffle_rows is None:
            shuffle_rows = max(batch_size, DEFAULT_SHUFFLE_BYTES // (2 * d))
        self.shuffle_rows = max(int(shuffle_rows), cache.layout.chunk_rows)
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.pieces = self._pieces(split, committed)
        if not len(self.pieces):
            raise SaeError(f"the cache at {cache.url} has no committed rows in split {split!r}")
        if len(self.pieces) < world_size:  # ranks take whole chunks: some rank would get none
            raise SaeError(
                f"the {split} split of {cache.url} has {len(self.pieces)} chunk(s) of rows for "
                f"{world_size} ranks, and each rank reads whole chunks; harvest more tokens or "
                "use fewer ranks"
            )
        self._bos = np.empty(0, np.int64) if keep_bos else cache.bos_rows(committed)
        lens = self.pieces[:, 1] - self.pieces[:, 0]
        bos_hi = np.searchsorted(self._bos, self.pieces[:, 1])
        bos_lo = np.searchsorted(self._bos, self.pieces[:, 0])
        self._kept = lens - (bos_hi - bos_lo)
        self._last = (self._epoch, self._rows)
        self._prefetch_depth = max(1, prefetch)
        self._iter: _Prefetch | None = None

    # --- plan (pure) ----------------------------------------------------------------------------
    def _check_cursor(self, cursor: dict) -> list[int]:
        if not isinstance(cursor, dict) or cursor.get("version") != CURSOR_VERSION:
            raise SaeError("the stream cursor is not one this sae wrote (bad version)")
        if cursor.get("cache", self.params["cache"]) != self.params["cache"]:  # absent: older sae
            raise SaeError(
                f"the stream cursor was made on another cache than {self.cache.url} (its "
                "identity or size differs); resume with the cache it was made on"
            )
        diff = [
            f"{k}: cursor {cursor.get(k)!r}, now {v!r}"
            for k, v in self.params.items()
            if k != "cache" and cursor.get(k) != v
        ]
        if diff:
            raise SaeError("the stream cursor was made with different settings: " + "; ".join(diff))
        epoch, rows, committed = cursor.get("epoch"), cursor.get("rows"), cursor.get("committed")
        ok = isinstance(epoch, int) and isinstance(rows, int) and epoch >= 0 and rows >= 0
        if not ok or not isinstance(committed, list) or len(committed) != len(self.cache.committed):
            raise SaeError("the stream cursor is damaged (epoch/rows/committed)")
        if any(
            not isinstance(c, int) or c > have
            for c, have in zip(committed, self.cache.committed, strict=True)
        ):
            raise SaeError("the stream cursor refers to rows this cache no longer has")
        self._epoch, self._rows = epoch, rows
        return committed

    def _pieces(self, split: str, committed: list[int]) -> np.ndarray:
        """Physical (start, stop) ranges of the split, cut at chunk boundaries."""
        lay = self.cache.layout
        heldout = min(lay.heldout_rows, committed[0])
        ranges = []
        for rank, n in enumerate(committed):
            start = lay.rank_range(rank)[0]
            lo, hi = start, start + n
            if split == "heldout":
                hi = min(hi, heldout) if rank == 0 else lo
            elif rank == 0:
                lo = start + heldout
            ranges.append((lo, hi))
        cr = lay.chunk_rows
        out = [
            (max(lo, c), min(hi, c + cr))
            for lo, hi in ranges
            if hi > lo
            for c in range(lo // cr * cr, hi, cr)
        ]
        return np.asarray(out, np.int64).reshape(-1, 2)

    def _windows(self, epoch: int) -> list[np.ndarray]:
        p = self.params
        n = len(self.pieces)
        order = (
            np.random.default_rng([p["seed"], epoch]).permutation(n)
            if p["shuffle"]
            else np.arange(n)
        )
        mine = order[p["rank"] :: p["world_size"]]
        lens = self.pieces[mine, 1] - self.pieces[mine, 0]
        windows, cur, rows = [], [], 0
        for i, length in zip(mine, lens, strict=True):
            if cur and rows + length > self.shuffle_rows:
                windows.append(np.asarray(cur))
                cur, rows = [], 0
            cur.append(i)
            rows += length
        if cur:
            windows.append(np.asarray(cur))
        return windows

    def _order(self, epoch: int, w: int, ids: np.ndarray) -> np.ndarray:
        """Indices into the loaded window of its kept rows, in stream order."""
        lens = self.pieces[ids, 1] - self.pieces[ids, 0]
        offsets = np.concatenate([[0], np.cumsum(lens)])
        total = int(offsets[-1])
        keep = np.ones(total, bool)
        if len(self._bos):
            for (a, b), off in zip(self.pieces[ids], offsets[:-1], strict=True):
                lo, hi = np.searchsorted(self._bos, [a, b])
                keep[self._bos[lo:hi] - a + off] = False
        idx = np.flatnonzero(keep)
        if self.params["shuffle"]:
            p = self.params
            rng = np.random.default_rng([p["seed"], epoch, p["rank"], p["world_size"], w])
            idx = idx[rng.permutation(len(idx))]
        return idx

    # --- loading --------------------------------------------------------------------------------
    def _window_jobs(self) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """(epoch, window, piece ids, rows to skip) for every window still to stream."""
        epoch, skip = self._epoch, self._rows
        while self.epochs is None or epoch < self.epochs:
            any_rows = False
            for w, ids in enumerate(self._windows(epoch)):
                kept = int(self._kept[ids].sum())
                any_rows = any_rows or kept > 0
                if skip >= kept:
                    skip -= kept
                    continue
                yield epoch, w, ids, skip
                skip = 0
            yield epoch, -1, np.empty(0, np.int64), 0  # end of epoch marker
            if not any_rows:
                raise SaeError("the split has no rows left after filtering; nothing to stream")
            epoch, skip = epoch + 1, 0

    def _load_windows(self) -> Iterator[tuple[int, int, torch.Tensor | None, np.ndarray]]:
        d = self.cache.d_model
        buffers = [np.empty((self.shuffle_rows, d), np.float16) for _ in range(3)]
        rows = self.cache.rows
        turn = 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cache-read") as pool:
            for epoch, w, ids, skip in self._window_jobs():
                if w < 0:
                    yield epoch, w, None, np.empty(0, np.int64)
                    continue
                buf = buffers[turn % 3]
                turn += 1
                lens = self.pieces[ids, 1] - self.pieces[ids, 0]
                offs = np.concatenate([[0], np.cumsum(lens)])

                def load(
                    k: int, buf: np.ndarray = buf, ids: np.ndarray = ids, offs: np.ndarray = offs
                ) -> None:
                    a, b = self.pieces[ids[k]]
                    buf[offs[k] : offs[k + 1]] = rows.read(int(a), int(b))

                list(pool.map(load, range(len(ids))))
                idx = self._order(epoch, w, ids)[skip:]
                yield epoch, w, torch.from_numpy(buf[: offs[-1]]), idx

    def _batches(self) -> Iterator[tuple[torch.Tensor, Any, int, int]]:
        """Gathers rows into batch buffers and moves them to the device."""
        b, d = self.batch_size, self.cache.d_model
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        # Pinned host buffers are reused once the copy that last read them has finished.
        ring: list[Any] = []
        if cuda:
            ring = [
                [torch.empty((b, d), dtype=torch.float16, pin_memory=True), None]
                for _ in range(self._prefetch_depth + 2)
            ]
        turn = 0
        loader = _Prefetch(self._load_windows(), 1, "cache-load")
        rows_done = self._rows
        out: torch.Tensor | None = None
        slot: list[Any] = []
        filled, empty_epochs, yielded = 0, 0, False

        def emit(n: int) -> tuple[torch.Tensor, Any]:
            assert out is not None
            if not cuda:
                return (out[:n] if self.dtype == torch.float16 else out[:n].to(self.dtype)), None
            with torch.cuda.stream(side):
                dev = out[:n].to(self.device, non_blocking=True).to(self.dtype)
                event = torch.cuda.Event()
                event.record(side)
            slot[1] = event
            return dev, event

        try:
            for epoch, w, buf, idx in loader:
                if w < 0:  # end of epoch
                    if filled and not self.drop_last:
                        yield (*emit(filled), epoch, rows_done + filled)
                        yielded = True
                    empty_epochs = 0 if yielded else empty_epochs + 1
                    if empty_epochs >= 2:
                        raise SaeError(
                            f"rank {self.params['rank']} gets fewer than batch_size={b} rows per "
                            "epoch from this split; use a smaller batch (--batch), fewer ranks, "
                            "or drop_last=False"
                        )
                    out, filled, rows_done, yielded = None, 0, 0, False
                    continue
                idx_t = torch.from_numpy(idx)
                pos = 0
                while pos < len(idx):
                    if out is None:
                        if cuda:
                            slot = ring[turn % len(ring)]
                            turn += 1
                            if slot[1] is not None:
                                slot[1].synchronize()
                            out = slot[0]
                        else:
                            out = torch.empty((b, d), dtype=torch.float16)
                    take = min(b - filled, len(idx) - pos)
                    torch.index_select(
                        buf, 0, idx_t[pos : pos + take], out=out[filled : filled + take]
                    )
                    filled += take
                    pos += take
                    if filled == b:
                        rows_done += b
                        yield (*emit(b), epoch, rows_done)
                        yielded = True
                        out, filled = None, 0
        finally:
            loader.close()

    # --- public -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._iter is not None:
            raise SaeError("a BatchStream can be iterated once; make a new one (pass cursor=)")
        self._iter = _Prefetch(self._batches(), self._prefetch_depth, "cache-batches")
        try:
            for item in self._iter:
                batch, event, epoch, rows = item
                if event is not None:
                    torch.cuda.current_stream(self.device).wait_event(event)
                    batch.record_stream(torch.cuda.current_stream(self.device))
                self._last = (epoch, rows)
                yield batch
        finally:
            # Also when the consumer breaks out of its loop or drops the iterator: the reader
            # threads and their ~3 shuffle windows of buffers go with it.
            self.close()

    def cursor(self) -> dict:
        """Where the stream stands after the last batch it yielded (JSON-serialisable)."""
        epoch, rows = self._last
        return {
            "version": CURSOR_VERSION,
            **self.params,
            "epoch": epoch,
            "rows": rows,
            "committed": list(self._committed),
        }

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
