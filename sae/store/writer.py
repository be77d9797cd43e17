"""CacheWriter: append activations from the harvest; a background thread writes whole shards.

Crash safety comes from ordering: a shard's data and its token rows are written (each object
replaced atomically, and on a local disk fsync'd) before the writer's commit record moves past
them, so a killed writer, or a machine that loses power, loses at most the rows after its last
commit, and a reader, which trusts only commit records, never sees rows that were not fully
written.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sae.atomic import fsync_files
from sae.errors import SaeError
from sae.store.layout import (
    ACTIVATIONS,
    FORMAT_NAME,
    POSITIONS,
    TOKEN_IDS,
    WRITERS,
    Layout,
    check_every_writer_has_rows,
    make_layout,
)
from sae.store.location import Location, locate
from sae.store.metadata import (
    check_root,
    json_normalise,
    read_record,
    record_key,
    root_attrs,
)
from sae.store.rows import mmap_supported, write_shard_file
from sae.store.stats import RunningStats, sanitize_block

COMPRESSIONS = (None, "zstd", "blosc")


_ZARR_CONFIG_LOCK = threading.Lock()


def _writing_empty_chunks(group: Any, name: str) -> Any:
    """group[name], opened to write all-zero chunks too. zarr keeps write_empty_chunks from
    creation only in the array object, not on disk; a reopened array skips all-zero chunks (a
    shard of sanitised NaNs), which the cache's readers and fsync expect to find."""
    array = group[name]
    if hasattr(array, "with_config"):  # zarr >= 3.1.6: no process-wide change
        return array.with_config({"write_empty_chunks": True})
    import zarr

    # Older zarr reads the setting from its global config when an array is opened; the lock
    # keeps writers opened from several threads from restoring each other's value.
    with _ZARR_CONFIG_LOCK, zarr.config.set({"array.write_empty_chunks": True}):
        return group[name]


@dataclass
class _Block:
    """One shard's worth of rows in host memory, filled by append and written by the thread."""

    acts: np.ndarray
    tokens: np.ndarray
    positions: np.ndarray
    start: int = 0  # rank-local row of acts[0]
    fill: int = 0  # rows filled
    pre: int = 0  # leading rows already committed (re-read on resume of a partial shard)
    stats: RunningStats | None = None
    states: list[tuple[int, dict]] = field(default_factory=list)


def _inner_codecs(compression: str | None) -> list[Any]:
    from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

    if compression is None:
        return [Crc32cCodec()]
    if compression == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if compression == "blosc":
        return [
            BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle, typesize=2),
            Crc32cCodec(),
        ]
    raise SaeError(f"compression {compression!r} unknown; use one of {COMPRESSIONS}")


def create_cache(
    loc: Location, layout: Layout, identity: dict, config: dict, compression: str | None
) -> None:
    """Write a new, empty cache: pre-sized arrays, the writers group, and the group attributes."""
    import zarr
    from zarr.codecs import Crc32cCodec

    try:
        store = loc.store(durable=True)
        group = zarr.open_group(store, mode="w")
    except OSError as err:
        raise SaeError(f"cannot create a cache at {loc.url}: {err}") from None
    d = layout.d_model
    group.create_array(
        ACTIVATIONS,
        shape=(layout.total_tokens, d),
        chunks=(layout.chunk_rows, d),
        shards=(layout.shard_rows, d),
        dtype="float16",
        compressors=_inner_codecs(compression),
        fill_value=0,
        dimension_names=("token", "dim"),
        config={"write_empty_chunks": True},
    )
    for name in (TOKEN_IDS, POSITIONS):
        group.create_array(
            name,
            shape=(layout.total_tokens,),
            chunks=(min(layout.token_chunk_rows, layout.total_tokens),),
            dtype="int32",
            compressors=[Crc32cCodec()],
            fill_value=-1,
            dimension_names=("token",),
            config={"write_empty_chunks": True},
        )
    group.create_group(WRITERS)
    # Attributes last: a directory without them is not yet a cache; a crash here leaves only
    # these metadata objects, which CacheWriter recognises and creates over.
    # One write (attrs.update would write once per key and expose a half-filled group).
    group.attrs.put(root_attrs(layout, identity, config, compression))


def _mismatch(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k}={old.get(k)!r} in the cache, {new.get(k)!r} now"
        for k in keys
        if old.get(k) != new.get(k)
    ]


class CacheWriter:
    """Writes this rank's share of a cache; resumable at its committed row count.

    See docs/store-format.md for the format and the crash-safety argument.
    """

    def __init__(
        self,
        url: str,
        *,
        d_model: int,
        total_tokens: int,
        identity: dict,
        attrs: dict,
        rank: int = 0,
        world_size: int = 1,
        overwrite: bool = False,
        chunk_rows: int | None = None,
        shard_rows: int | None = None,
        compression: str | None = None,
        wait_s: float = 600.0,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        """`barrier`: waits until every writer has called it. Several writers need one to
        overwrite: rank 0 removes the old cache and creates the new one before it, the others
        open the cache after it (otherwise one might resume its record in the old cache)."""
        if compression not in COMPRESSIONS:
            raise SaeError(f"compression {compression!r} unknown; use one of {COMPRESSIONS}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise SaeError(f"rank {rank!r} must be in [0, world_size={world_size})")
        identity = json_normalise(identity, "identity")
        config = json_normalise(attrs, "attrs")
        if identity.get("d_model", d_model) != d_model:
            raise SaeError(f"identity d_model={identity['d_model']} differs from d_model={d_model}")
        self.loc = locate(url)
        self.rank = rank
        layout = make_layout(total_tokens, d_model, world_size, chunk_rows, shard_rows)
        if overwrite or not self._holds_cache():  # a new cache (every rank checks alike)
            check_every_writer_has_rows(layout)
        if overwrite and world_size > 1:
            if barrier is None:
                raise SaeError(
                    "overwriting a cache with several writers needs them to agree on when the "
                    "old one is gone: run them under torchrun (sae harvest then does), or delete "
                    f"{url} first and write without overwrite"
                )
            if rank == 0:
                self.layout = self._open_or_create(layout, identity, config, compression, True, 0)
                barrier()
            else:
                barrier()  # rank 0 has replaced the old cache: open the new one
                self.layout = self._open_or_create(
                    layout, identity, config, compression, False, wait_s
                )
        else:
            self.layout = self._open_or_create(
                layout, identity, config, compression, overwrite, wait_s
            )
        self._finish_init()

    # --- opening -----------------------------------------------------------------------------
    def _open_or_create(
        self,
        layout: Layout,
        identity: dict,
        config: dict,
        compression: str | None,
        overwrite: bool,
        wait_s: float,
    ) -> Layout:
        deadline = time.monotonic() + wait_s
        if overwrite and self.rank == 0 and not self.loc.is_empty():
            meta = self.loc.read_json("zarr.json") or {}
            attrs = meta.get("attributes")
            ours = isinstance(attrs, dict) and attrs.get("format") == FORMAT_NAME
            if not ours and not self._interrupted_creation(meta):
                raise SaeError(
                    f"{self.loc.url} is not an sae cache; refusing to delete it for overwrite. "
                    "Pass an empty or new path"
                )
            self.loc.remove_all()
        while True:
            meta = self.loc.read_json("zarr.json")
            attrs = meta.get("attributes") if meta else None
            if attrs and "format" in attrs:
                existing = check_root(attrs, self.loc.url)
                problem = self._compare(existing, attrs, layout, identity)
                if problem is None:
                    return existing
                if not (overwrite and self.rank > 0) or time.monotonic() > deadline:
                    raise SaeError(problem)
            elif self.rank == 0 and meta is not None and self._interrupted_creation(meta):
                self.loc.remove_all()  # only create_cache makes such a group: start it again
                create_cache(self.loc, layout, identity, config, compression)
                return layout
            elif (
                meta is not None
                and not overwrite
                and (self.rank == 0 or meta.get("node_type") != "group")
            ):
                raise SaeError(
                    f"{self.loc.url} holds zarr data that is not an sae cache; "
                    "choose a new path or pass overwrite (--overwrite) to replace it"
                )
            elif self.rank == 0:
                if not self.loc.is_empty():
                    raise SaeError(
                        f"{self.loc.url} exists and is not empty, but is not an sae cache; "
                        "pass a new or empty path"
                    )
                create_cache(self.loc, layout, identity, config, compression)
                return layout
            if time.monotonic() > deadline:
                raise SaeError(
                    f"rank {self.rank}: no cache appeared at {self.loc.url} within {wait_s:.0f} s; "
                    "rank 0 creates it: start rank 0 with the same path"
                )
            time.sleep(0.2)

    def _holds_cache(self) -> bool:
        """Whether an sae cache already exists here (it keeps its own layout)."""
        meta = self.loc.read_json("zarr.json")
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        return isinstance(attrs, dict) and "format" in attrs

    def _interrupted_creation(self, meta: dict) -> bool:
        """A group that create_cache began and a crash cut short: no attributes yet and nothing
        but the metadata objects create_cache writes before them (so no one else's data)."""
        if not isinstance(meta, dict) or meta.get("node_type") != "group":
            return False
        if meta.get("attributes") not in (None, {}):
            return False
        names = ("", f"{ACTIVATIONS}/", f"{TOKEN_IDS}/", f"{POSITIONS}/", f"{WRITERS}/")
        keys = {key.replace("\\", "/") for key, _ in self.loc.files()}
        return keys <= {f"{name}zarr.json" for name in names}

    def _compare(self, existing: Layout, attrs: dict, layout: Layout, identity: dict) -> str | None:
        """Why this writer cannot continue the existing cache, or None if it can."""
        lines = _mismatch(attrs["identity"], identity)
        for key in ("d_model", "total_tokens", "world_size"):
            if getattr(existing, key) != getattr(layout, key):
                lines.append(
                    f"{key}={getattr(existing, key)} in the cache, {getattr(layout, key)} now"
                )
        if not lines:
            return None
        return (
            f"{self.loc.url} already holds a cache with a different configuration: "
            + "; ".join(lines)
            + ". Use a new path, or overwrite (--overwrite) to replace it"
        )

    def _finish_init(self) -> None:
        import zarr

        group = zarr.open_group(self.loc.store(durable=True), mode="r+")
        self._group = group
        self._acts = _writing_empty_chunks(group, ACTIVATIONS)
        self._tokens = _writing_empty_chunks(group, TOKEN_IDS)
        self._positions = _writing_empty_chunks(group, POSITIONS)
        meta = self.loc.read_json(f"{ACTIVATIONS}/zarr.json") or {}
        self._fast_shards = mmap_supported(self.loc.local, meta, self.layout)
        self.row_start, self.row_stop = self.layout.rank_range(self.rank)
        record = read_record(self.loc, self.layout, self.rank)
        if record.finished:  # writing again: not done until it says so (input_ended) again
            record.finished = False
            self.loc.write_json(record_key(self.rank), record.to_json(self.layout))
        self._record = record
        self._committed = record.committed
        self._appended = record.committed
        self._pending_states: list[tuple[int, dict]] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        rows = self.layout.shard_rows
        d = self.layout.d_model
        self._free: queue.Queue[_Block] = queue.Queue()
        for _ in range(2):
            self._free.put(
                _Block(
                    np.empty((rows, d), np.float16),
                    np.empty(rows, np.int32),
                    np.empty(rows, np.int32),
                )
            )
        self._todo: queue.Queue[_Block | None] = queue.Queue(maxsize=1)
        self._block = self._new_block(self._committed)
        if self._block.start < self._committed and self._committed < self.target:
            self._reload_partial_shard()
        self._thread = threading.Thread(
            target=self._run, name=f"cache-writer-{self.rank}", daemon=True
        )
        self._thread.start()
        # Local caches: a second thread makes each shard's files durable (fsync) while the first
        # encodes the next shard, and only then commits (see _run_durable).
        self._durable: (
            queue.Queue[tuple[int, int, np.ndarray, np.ndarray, RunningStats] | None] | None
        ) = None
        self._durable_thread: threading.Thread | None = None
        if self.loc.local is not None:
            self._durable = queue.Queue(maxsize=1)
            self._durable_thread = threading.Thread(
                target=self._run_durable, name=f"cache-sync-{self.rank}", daemon=True
            )
            self._durable_thread.start()
        self._closed = False
        self._interrupted = False  # an append() stopped part-way (see close())
        self._input_ended = False  # input_ended(): the dataset ran out short of the range

    def _new_block(self, start: int) -> _Block:
        block = self._free.get()
        block.start = start - start % self.layout.shard_rows
        block.fill = block.pre = start - block.start
        block.stats = RunningStats(self.layout.d_model)
        block.states = []
        return block

    def _reload_partial_shard(self) -> None:
        """A previous close committed part of a shard: keep those rows so the shard is rewritten whole."""
        b = self._block
        g0 = self.row_start + b.start
        g1 = self.row_start + self._committed
        b.acts[: b.fill] = self._acts[g0:g1]
        b.tokens[: b.fill] = self._tokens[g0:g1]
        b.positions[: b.fill] = self._positions[g0:g1]

    # --- public API ----------------------------------------------------------------------------
    @property
    def committed(self) -> int:
        """Rows of this rank that are durably written (where a resumed harvest continues)."""
        return self._committed

    @property
    def target(self) -> int:
        return self.row_stop - self.row_start

    @property
    def resume_state(self) -> tuple[int, dict | None]:
        return self._record.resume_rows, self._record.resume_state

    def append(self, acts: Any, token_ids: Any, positions: Any, state: dict | None = None) -> None:
        """Copy rows into the host buffer; full shards are written in the background."""
        self._raise_if_failed()
        if self._closed:
            raise SaeError("append() on a closed CacheWriter")
        x = _as_tensor(acts)
        tok = np.asarray(_as_numpy(token_ids))
        pos = np.asarray(_as_numpy(positions))
        n = x.shape[0] if x.ndim == 2 else -1
        if x.ndim != 2 or x.shape[1] != self.layout.d_model:
            raise SaeError(
                f"activations of shape {tuple(x.shape)} do not fit this cache: "
                f"expected (n, {self.layout.d_model}) (d_model={self.layout.d_model})"
            )
        if tok.shape != (n,) or pos.shape != (n,):
            raise SaeError(
                f"token_ids {tuple(tok.shape)} and positions {tuple(pos.shape)} must both be ({n},)"
            )
        if self._appended + n > self.target:
            raise SaeError(
                f"rank {self.rank} would write {self._appended + n} rows, more than its "
                f"{self.target} (total_tokens={self.layout.total_tokens})"
            )
        if state is not None:
            state = json_normalise(state, "state")
        # From here until the rows are in, an exception (Ctrl-C included) can leave the buffered
        # block half updated (statistics ahead of its fill, or already queued while a fresh
        # one was awaited); close() then drops that tail instead of committing it.
        self._interrupted = True
        if state is not None:
            with self._lock:
                self._pending_states.append((self._appended + n, state))
        i = 0
        while i < n:
            b = self._block
            take = min(n - i, self.layout.shard_rows - b.fill)
            sanitize_block(x[i : i + take], b.acts[b.fill : b.fill + take], b.stats)
            b.tokens[b.fill : b.fill + take] = tok[i : i + take]
            b.positions[b.fill : b.fill + take] = pos[i : i + take]
            b.fill += take
            i += take
            self._appended += take
            if b.fill == self.layout.shard_rows:
                self._submit()
        self._interrupted = False

    def close(self) -> None:
        """Write the buffered tail, wait for the background writer, and commit.

        After an append that an exception cut short, the tail is dropped rather than
        committed: the record then ends at the last whole block, and a resumed harvest
        writes the rest again (nothing lost, nothing counted twice)."""
        if self._closed:
            return
        self._closed = True
        if self._error is None and not self._interrupted and self._block.fill > self._block.pre:
            self._submit(last=True)
        self._todo.put(None)
        self._thread.join()
        if self._durable_thread is not None:
            self._durable_thread.join()
        self._raise_if_failed()
        if self._input_ended and not self._interrupted:
            self._record.finished = True
            self.loc.write_json(record_key(self.rank), self._record.to_json(self.layout))
            self._refresh_summary()

    def input_ended(self) -> None:
        """Say that no more rows will come (the dataset ran out before this writer's range was
        full), so that closing marks the writer finished and the cache's summary can count it."""
        self._input_ended = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- background thread ---------------------------------------------------------------------
    def _submit(self, last: bool = False) -> None:
        # Blocking is safe: the thread drains the queue and frees blocks even after a failure.
        self._todo.put(self._block)
        if not last:
            self._block = self._new_block(self._appended)
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise SaeError(
                f"the background cache writer failed: {self._error}. Rows up to {self._committed} "
                f"of rank {self.rank} are committed and readable; fix the cause and re-run to resume"
            ) from self._error

    def _run(self) -> None:
        while True:
            block = self._todo.get()
            if block is None:
                if self._durable is not None:
                    self._durable.put(None)
                return
            try:
                if self._error is None:
                    self._write(block)
            except BaseException as err:  # reported to the caller on its next call
                self._error = err
            finally:
                self._free.put(block)

    def _write(self, b: _Block) -> None:
        g0 = self.row_start + b.start
        g1 = g0 + b.fill
        if self._fast_shards:
            shard = g0 // self.layout.shard_rows
            write_shard_file(self.loc.local, self.layout, shard, b.acts[: b.fill], sync=b.pre > 0)
        else:
            self._acts[g0:g1] = b.acts[: b.fill]
        tokens, positions = b.tokens[: b.fill], b.positions[: b.fill]
        if self._durable is None:  # object stores: each PUT is durable when it returns
            self._write_token_rows(g0, g1, tokens, positions)
            self._commit(b.start + b.fill, b.stats)
        else:  # copies: the block is refilled while the sync thread writes these
            self._durable.put((g0, g1, tokens.copy(), positions.copy(), b.stats))

    def _write_token_rows(
        self, g0: int, g1: int, tokens: np.ndarray, positions: np.ndarray
    ) -> None:
        """Token ids and positions of global rows [g0, g1). Their chunks span several shards, so
        each write rewrites rows already committed: locally, the durable store flushes the new
        file before it replaces the old one."""
        self._tokens[g0:g1] = tokens
        self._positions[g0:g1] = positions

    def _files_of_rows(self, g0: int, g1: int) -> list[str]:
        """Keys of the files that hold global rows [g0, g1): activation shards, token and
        position chunks."""
        keys = []
        for name, array in ((TOKEN_IDS, self._tokens), (POSITIONS, self._positions)):
            step = array.shards[0] if array.shards else array.chunks[0]
            keys += [f"{name}/c/{i}" for i in range(g0 // step, (g1 - 1) // step + 1)]
        step = self.layout.shard_rows
        keys += [f"{ACTIVATIONS}/c/{i}/0" for i in range(g0 // step, (g1 - 1) // step + 1)]
        return keys

    def _run_durable(self) -> None:
        """Write a shard's token ids and positions, fsync all its files and their folders, then
        commit the rows they hold: the commit record (itself fsync'd) never counts rows that a
        power cut or node crash could take back. Runs beside _run, so the disk flushes one shard
        (and the flushes of the rewritten token chunks wait on it) while the next is encoded."""
        assert self._durable is not None and self.loc.local is not None
        while (item := self._durable.get()) is not None:
            g0, g1, tokens, positions, stats = item
            try:
                if self._error is None:
                    self._write_token_rows(g0, g1, tokens, positions)
                    fsync_files(self.loc.local, self._files_of_rows(g0, g1))
                    self._commit(g1 - self.row_start, stats)
            except BaseException as err:  # reported to the caller on its next call
                self._error = err

    def _commit(self, committed: int, stats: RunningStats) -> None:
        rec = self._record
        with self._lock:
            while self._pending_states and self._pending_states[0][0] <= committed:
                rec.resume_rows, rec.resume_state = self._pending_states.pop(0)
        rec.stats.merge(stats)
        rec.committed = committed
        self.loc.write_json(record_key(self.rank), rec.to_json(self.layout))
        self._committed = committed
        self._refresh_summary()

    def _refresh_summary(self) -> None:
        """Mirror the total into the group attributes for plain-zarr readers.

        Only when the result is the same whichever writer computes it (one writer, or all done:
        full, or finished short because their input ran out), so concurrent writers never race
        to different contents.
        """
        layout = self.layout
        records = [read_record(self.loc, layout, r) for r in range(layout.world_size)]
        done = all(
            r.finished or r.committed == layout.rank_range(r.rank)[1] - layout.rank_range(r.rank)[0]
            for r in records
        )
        if layout.world_size > 1 and not done:
            return
        total = RunningStats(layout.d_model)
        for r in records:
            total.merge(r.stats)
        summary = total.summary()
        summary["mean"] = [float(v) for v in summary["mean"]]
        meta = self.loc.read_json("zarr.json")
        if meta is None or not isinstance(meta.get("attributes"), dict):
            raise SaeError(f"{self.loc.url}/zarr.json vanished or was damaged while writing")
        meta["attributes"].update(tokens_committed=total.count, stats=summary)
        self.loc.write_json("zarr.json", meta)


def _as_numpy(x: Any) -> np.ndarray:
    """Token ids / positions from tensors or arrays."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_tensor(x: Any) -> Any:
    """Activations as a CPU torch tensor (any float dtype, pinned or not), without copying."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(x))
