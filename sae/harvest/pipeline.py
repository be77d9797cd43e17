"""The harvest loop: packed windows -> model up to block L -> host -> store, all overlapped.

On CUDA three things run at once: the forward pass of batch i+1 on the compute stream, the
device-to-host copy of batch i into a pinned buffer on a side stream, and the store's background
thread compressing and writing earlier rows. Tokenization runs in its own thread ahead of all
three. The main thread only launches kernels and hands finished host buffers to the writer, so
the GPU waits for the disk only when the disk is the slower of the two.

Resume: every ``append`` carries the stream position of its batch's first window and the rank's
row count there; the store hands back the last such state whose rows are all committed, so a
re-run restarts the packer at that window and drops the rows already committed.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sae.errors import SaeError
from sae.harvest.config import HarvestConfig
from sae.harvest.model import (
    LayerModel,
    dtype_name,
    hook_name,
    load_layer_model,
    load_tokenizer,
    resolve_dtype,
)
from sae.harvest.packing import Prefetcher, StreamPos, Window, pack_windows
from sae.harvest.text import HubSource, TextSource, open_source
from sae.runtime import RankInfo, rank_info, resolve_device, torchrun_barrier

# Fault injection for the resume test: SIGKILL this process once this many rows are committed.
KILL_ENV = "SAE_HARVEST_TEST_KILL_AT_ROWS"


@dataclass(frozen=True)
class Batch:
    """Windows of one length stacked for one forward pass."""

    first: Window
    ids: np.ndarray  # (n_windows, seq) int32

    @property
    def rows(self) -> int:
        return self.ids.size


@dataclass
class HarvestReport:
    url: str
    rank: int
    world_size: int
    target: int  # rows this rank had to write
    committed: int  # rows this rank has committed
    resumed_from: int
    seconds: float
    exhausted: bool  # the dataset ran out before the budget
    store_wait_s: float = 0.0  # main thread waited for the store (disk or CPU slower than GPU)
    append_s: float = 0.0  # time inside writer.append (host copy, float16 conversion, stats)


def batched(windows: Iterator[Window], batch_size: int) -> Iterator[Batch]:
    """Group consecutive windows of equal length (only a dataset's last one is shorter)."""
    group: list[Window] = []
    for window in windows:
        if group and (len(group) == batch_size or len(window.ids) != len(group[0].ids)):
            yield Batch(group[0], np.stack([w.ids for w in group]))
            group = []
        group.append(window)
    if group:
        yield Batch(group[0], np.stack([w.ids for w in group]))


def parse_resume_state(
    state: Any, rows: int, committed: int, ranks: RankInfo
) -> tuple[int, StreamPos, int]:
    """(first window, stream position, rank row count there) from the store's resume state.

    The state comes from a cache on disk, so it is checked like any untrusted input.
    """
    if state is None:  # a fresh cache (or rows without a state): start over, drop what is there
        return 0, StreamPos(), 0
    keys = ("window", "doc", "offset", "rows_before")
    if not isinstance(state, dict) or not all(
        isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and state[k] >= 0
        for k in keys
    ):
        raise SaeError(
            f"the cache's resume state {state!r} is not one this harvest wrote; use --overwrite"
        )
    if state["window"] % ranks.world_size != ranks.rank or not (
        state["rows_before"] <= rows <= committed
    ):
        raise SaeError(
            f"the cache's resume state {state!r} does not fit rank {ranks.rank} of "
            f"{ranks.world_size} with {committed} committed rows; use --overwrite"
        )
    return state["window"], StreamPos(state["doc"], state["offset"]), state["rows_before"]


class PinnedRing:
    """A few pinned host buffers reused round-robin as D2H copy targets."""

    def __init__(self, count: int, rows: int, d_model: int, dtype: torch.dtype) -> None:
        self.buffers = [
            torch.empty((rows, d_model), dtype=dtype, pin_memory=True) for _ in range(count)
        ]
        self.next_index = 0

    def take(self, rows: int) -> torch.Tensor:
        buffer = self.buffers[self.next_index]
        self.next_index = (self.next_index + 1) % len(self.buffers)
        return buffer[:rows]


@dataclass
class _Pending:
    event: Any
    acts: torch.Tensor
    token_ids: np.ndarray
    positions: np.ndarray
    state: dict


def check_source_has_text(source: TextSource) -> None:
    """Fail early (before a cache is created) on an empty dataset or a missing text column."""
    for _ in source.documents(0):
        return
    raise SaeError(f"dataset {source.name!r} holds no text (no non-empty documents)")


def run_harvest(
    config: HarvestConfig, *, lm: LayerModel | None = None, tokenizer: Any = None
) -> HarvestReport:
    """Harvest ``config.tokens`` rows (all ranks together) of ``config.layer`` into ``config.out``.

    ``lm`` and ``tokenizer`` may be given already loaded (benchmarks); otherwise they are loaded
    from ``config.model``.
    """
    from sae.store import CacheWriter

    ranks = rank_info()
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device)
    if config.context < 2:
        raise SaeError("--context must be at least 2 (BOS + one token)")
    if config.batch_size < 1:
        raise SaeError("--batch-size must be at least 1")
    if config.layer < 0:
        raise SaeError(f"--layer must be >= 0, got {config.layer}")
    source = open_source(config.dataset, config.dataset_config, config.split, config.text_column)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model, config.revision)
    if lm is None:
        lm = load_layer_model(
            config.model, config.layer, device=device, dtype=dtype, revision=config.revision
        )
    limit = getattr(lm, "max_positions", None)
    if limit is not None and config.context > limit:
        raise SaeError(
            f"--context {config.context} is longer than the {limit} positions {config.model} "
            f"takes; use --context {limit} or less"
        )
    check_source_has_text(source)

    identity = config.identity(
        d_model=lm.d_model,
        dtype=dtype_name(lm.dtype),
        hook=hook_name(config.layer),
        tokenizer=config.model,  # the tokenizer always comes with the model
    )
    if not isinstance(source, HubSource):
        identity["dataset_config"] = None
    attrs = {
        "harvest": config.to_json(),
        "n_layers": lm.n_layers,
        "hook_site": f"residual stream after block {config.layer} = hidden_states[{config.layer + 1}]",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "world_size": ranks.world_size,
    }
    writer = CacheWriter(
        config.out,
        d_model=lm.d_model,
        total_tokens=config.tokens,
        identity=identity,
        attrs=attrs,
        rank=ranks.rank,
        world_size=ranks.world_size,
        overwrite=config.overwrite,
        chunk_rows=config.chunk_rows,
        shard_rows=config.shard_rows,
        barrier=torchrun_barrier if ranks.world_size > 1 and config.overwrite else None,
    )
    start_time = time.perf_counter()
    with writer:
        rows, state = writer.resume_state
        committed = writer.committed
        first_window, start_pos, rows_before = parse_resume_state(state, rows, committed, ranks)
        windows = pack_windows(
            source,
            tokenizer,
            config.context,
            start=start_pos,
            first_window=first_window,
            rank=ranks.rank,
            world_size=ranks.world_size,
        )
        batches = Prefetcher(batched(windows, config.batch_size), depth=8)
        try:
            exhausted, feeder = _harvest_loop(
                lm,
                writer,
                batches,
                config,
                ranks,
                drop=committed - rows_before,
                stream_rows=rows_before,
            )
            if exhausted:
                writer.input_ended()
        finally:
            batches.close()
    return HarvestReport(
        url=config.out,
        rank=ranks.rank,
        world_size=ranks.world_size,
        target=writer.target,
        committed=writer.committed,
        resumed_from=committed,
        seconds=time.perf_counter() - start_time,
        exhausted=exhausted,
        store_wait_s=feeder.wait_s,
        append_s=feeder.append_s,
    )


class StoreFeeder:
    """Hands finished host rows to the store writer.

    On CUDA this runs in its own thread: ``writer.append`` does real CPU work (float16
    conversion, statistics) and must not stop the main thread from launching the next forward.
    On CPU it appends inline (the forward pass already uses every core).
    """

    def __init__(self, writer, on_appended, *, threaded: bool, depth: int = 2) -> None:
        self.writer = writer
        self.on_appended = on_appended
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.wait_s = 0.0  # main thread blocked because the store lags (queue full)
        self.append_s = 0.0  # time spent inside writer.append
        if threaded:
            self.queue: queue.Queue = queue.Queue(maxsize=depth)
            self.thread = threading.Thread(target=self._run, name="harvest-feeder", daemon=True)
            self.thread.start()

    def put(self, item: _Pending) -> None:
        self._raise_if_failed()
        if self.thread is None:
            self._append(item)
        else:
            start = time.perf_counter()
            self.queue.put(item)
            self.wait_s += time.perf_counter() - start

    def finish(self) -> None:
        """Wait until everything handed over is appended (or failed)."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        self._raise_if_failed()

    def _append(self, item: _Pending) -> None:
        if item.event is not None:
            item.event.synchronize()
        start = time.perf_counter()
        self.writer.append(item.acts, item.token_ids, item.positions, state=item.state)
        self.append_s += time.perf_counter() - start
        self.on_appended(len(item.token_ids))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._append(item)
                except BaseException as err:  # re-raised in the main thread
                    self.error = err

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


def _harvest_loop(
    lm: LayerModel,
    writer,
    batches: Iterator[Batch],
    config: HarvestConfig,
    ranks: RankInfo,
    *,
    drop: int,
    stream_rows: int,
) -> tuple[bool, StoreFeeder]:
    """Run every batch this rank still needs; (dataset ran out first, the feeder's timings)."""
    from sae.progress import make_progress
    from sae.units import format_bytes

    d_model = lm.d_model
    remaining = writer.target - writer.committed
    cuda = lm.device.type == "cuda"
    # numpy (the store's side) has no bfloat16: hand over float16 models as is, anything else
    # as float32 (upcast on the GPU, where it is free; twice the PCIe bytes is far below its rate).
    host_dtype = torch.float16 if lm.dtype == torch.float16 else torch.float32
    depth = 2
    # Buffers in use at once: `depth` queued + 1 being appended + 1 being filled.
    ring = (
        PinnedRing(depth + 2, config.batch_size * config.context, d_model, host_dtype)
        if cuda
        else None
    )
    copy_stream = torch.cuda.Stream(lm.device) if cuda else None
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    appended = writer.committed
    bytes_per_row = d_model * 2

    progress = make_progress("tok", extra="{task.fields[written]} written")
    show = config.progress and ranks.is_main
    label = "harvest" if ranks.world_size == 1 else f"harvest rank 0/{ranks.world_size}"
    task = progress.add_task(
        label,
        total=writer.target,
        completed=writer.committed,
        written=format_bytes(appended * bytes_per_row),
    )

    def on_appended(rows: int) -> None:
        nonlocal appended
        appended += rows
        # appended, not committed: the tail commits only when the writer closes, and a bar that
        # ends at "0 B written" after a short harvest reads as lost data
        progress.update(task, advance=rows, written=format_bytes(appended * bytes_per_row))
        if kill_at and (writer.committed >= kill_at or appended >= 2 * kill_at):
            _kill_when_committed(writer, kill_at)

    feeder = StoreFeeder(writer, on_appended, threaded=cuda, depth=depth)
    if show:
        progress.start()
    try:
        for batch in batches:
            if remaining <= 0:
                break
            n_windows, seq = batch.ids.shape
            lo = min(drop, batch.rows)
            drop -= lo
            hi = min(batch.rows, lo + remaining)
            state = {
                "window": batch.first.index,
                "doc": batch.first.start.doc,
                "offset": batch.first.start.offset,
                "rows_before": stream_rows,
            }
            stream_rows += batch.rows
            if hi <= lo:
                continue  # already committed by an earlier run
            remaining -= hi - lo
            token_ids = batch.ids.reshape(-1)[lo:hi]
            positions = np.tile(np.arange(seq, dtype=np.int32), n_windows)[lo:hi]
            ids = torch.from_numpy(batch.ids.astype(np.int64))
            if cuda:
                ids = ids.pin_memory().to(lm.device, non_blocking=True)
            acts = lm(ids).reshape(-1, d_model)[lo:hi]
            if acts.dtype != host_dtype:
                acts = acts.to(host_dtype)
            if not cuda:
                feeder.put(_Pending(None, acts, token_ids, positions, state))
                continue
            host = ring.take(hi - lo)
            copy_stream.wait_stream(torch.cuda.current_stream(lm.device))
            with torch.cuda.stream(copy_stream):
                host.copy_(acts, non_blocking=True)
                event = torch.cuda.Event()
                event.record(copy_stream)
            acts.record_stream(copy_stream)
            feeder.put(_Pending(event, host, token_ids, positions, state))
    finally:
        try:
            feeder.finish()
        finally:
            if show:
                progress.stop()
    return remaining > 0, feeder


def _kill_when_committed(writer, rows: int, timeout: float = 30.0) -> None:
    """Test hook: wait until ``rows`` are committed, then die as if the machine had lost power."""
    deadline = time.monotonic() + timeout
    while writer.committed < rows and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
