"""Where training batches come from: the activation cache, or tensors held in memory.

The trainer only needs the small `DataSource` interface below, so tests can also feed it exact
batches (e.g. to check that two ranks equal one process with the same global batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from sae.errors import SaeError


class BatchIterator(Protocol):
    """An endless iterator of (batch, d_model) tensors whose position can be saved."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...
    def __next__(self) -> torch.Tensor: ...
    def cursor(self) -> dict: ...
    def close(self) -> None: ...


class DataSource(Protocol):
    """Training input: sizes, provenance, a sample for initialisation, and batch streams."""

    d_model: int
    n_train_tokens: int
    provenance: dict

    def sample(self, n: int, seed: int) -> torch.Tensor: ...
    def heldout(self, n: int) -> torch.Tensor: ...
    def train_batches(
        self, batch: int, *, seed: int, rank: int, world_size: int, device, cursor: dict | None
    ) -> BatchIterator: ...


class _StoreIterator:
    """Adapts the store's BatchStream (an iterable with cursor()) to an iterator."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self._it = iter(stream)

    def __iter__(self) -> _StoreIterator:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._it)

    def cursor(self) -> dict:
        return self.stream.cursor()

    def close(self) -> None:
        self.stream.close()


class CacheSource:
    """A Zarr activation cache written by `sae harvest` (train split for training)."""

    def __init__(self, url: str, read_workers: int | None = None) -> None:
        self.read_workers = read_workers  # reader threads (None: the store's default)
        if "://" not in url and not Path(url).expanduser().exists():
            raise SaeError(
                f"no cache at {url}; pass the --out directory of `sae harvest` as --cache"
            )
        from sae.store import open_cache

        self.cache = open_cache(url)
        self.d_model = int(self.cache.d_model)
        start, stop = self.cache.heldout_rows
        self.n_heldout = int(stop - start)
        self.n_train_tokens = int(self.cache.n_tokens) - self.n_heldout
        if self.n_train_tokens <= 0:
            target = self.cache.layout.total_tokens
            raise SaeError(
                f"cache {url} has no training tokens: all {self.cache.n_tokens} of its rows are "
                f"the held-out split (rows [0, {stop}), sized for the {target} tokens it was "
                "created for). Harvest the rest into it (the same `sae harvest` command), or, if "
                "the dataset ran out, harvest into a new --out with --tokens at most what it holds"
            )
        # What the cache says it came from; a field it leaves out is recorded as unknown
        # (the TrainConfig defaults: "", -1, 0) rather than refused: training needs none of them.
        cache = self.cache
        self.provenance = {
            "model": cache.model if cache.model is not None else "",
            "layer": cache.layer if cache.layer is not None else -1,
            "hook": cache.hook if cache.hook is not None else "",
            "cache_url": str(url),
            "context": cache.context if cache.context is not None else 0,
        }

    def sample(self, n: int, seed: int) -> torch.Tensor:
        # Position-0 rows are dropped from the split; counting every BOS row of the cache gives a
        # safe lower bound on the rows the train split keeps.
        kept = self.n_train_tokens - len(self.cache.bos_rows())
        return self.cache.sample(max(1, min(n, kept)), seed=seed, split="train")

    def heldout(self, n: int) -> torch.Tensor:
        if self.n_heldout == 0:
            return torch.empty(0, self.d_model)
        size = min(n, self.n_heldout)
        stream = self.cache.batches(size, split="heldout", shuffle=False, epochs=1, drop_last=False)
        try:
            return next(iter(stream))
        finally:
            stream.close()

    def train_batches(self, batch, *, seed, rank, world_size, device, cursor):
        stream = self.cache.batches(
            batch,
            split="train",
            seed=seed,
            device=device,
            dtype=torch.float16,  # half the host→GPU bytes; the model casts on the device
            rank=rank,
            world_size=world_size,
            epochs=None,
            cursor=cursor,
            workers=self.read_workers,
        )
        return _StoreIterator(stream)


class _TensorIterator:
    """Rank r of W takes global batch i's rows [r·b, (r+1)·b), so ranks partition each step."""

    def __init__(self, data, batch, rank, world_size, device, cursor) -> None:
        self.data, self.batch, self.device = data, batch, device
        self.rank, self.world_size = rank, world_size
        self.step = int(cursor["step"]) if cursor else 0
        self.n_steps = data.shape[0] // (batch * world_size)
        if self.n_steps == 0:
            raise SaeError("fewer tokens than one global batch")

    def __iter__(self) -> _TensorIterator:
        return self

    def __next__(self) -> torch.Tensor:
        i = self.step % self.n_steps
        start = (i * self.world_size + self.rank) * self.batch
        self.step += 1
        return self.data[start : start + self.batch].to(self.device)

    def cursor(self) -> dict:
        return {"step": self.step}

    def close(self) -> None:
        pass


class TensorSource:
    """In-memory activations in a fixed order (no shuffling): for tests and experiments."""

    def __init__(self, train: torch.Tensor, heldout: torch.Tensor, provenance=None) -> None:
        self.train, self.held = train.float(), heldout.float()
        self.d_model = int(train.shape[1])
        self.n_train_tokens = int(train.shape[0])
        self.provenance = provenance or {"cache_url": "memory"}

    def sample(self, n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return self.train[torch.randperm(self.n_train_tokens, generator=gen)[:n]]

    def heldout(self, n: int) -> torch.Tensor:
        return self.held[:n]

    def train_batches(self, batch, *, seed, rank, world_size, device, cursor):
        return _TensorIterator(self.train, batch, rank, world_size, device, cursor)
