"""Synthetic activations from a planted sparse dictionary, for SAE training tests.

Each token is a non-negative combination of a few unit directions drawn from a fixed random
dictionary, so a good SAE must find those directions (checked by max cosine similarity).
"""

from __future__ import annotations

import torch


def planted_dictionary(n_features: int, d_model: int, seed: int = 0) -> torch.Tensor:
    """(n_features, d_model) random unit directions."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d_model, generator=gen)
    return dirs / dirs.norm(dim=1, keepdim=True)


def planted_activations(
    dictionary: torch.Tensor, n_tokens: int, active: int = 3, seed: int = 1
) -> torch.Tensor:
    """(n_tokens, d_model): each row sums `active` distinct directions with magnitudes in [1, 3]."""
    gen = torch.Generator().manual_seed(seed)
    n_features = dictionary.shape[0]
    which = torch.rand(n_tokens, n_features, generator=gen).argsort(dim=1)[:, :active]
    mags = 1.0 + 2.0 * torch.rand(n_tokens, active, generator=gen)
    return (mags.unsqueeze(-1) * dictionary[which]).sum(1)


def recovery(decoder: torch.Tensor, dictionary: torch.Tensor) -> float:
    """Mean over planted directions of the best cosine similarity with any decoder row."""
    dec = decoder / decoder.norm(dim=1, keepdim=True)
    return (dictionary @ dec.T).max(dim=1).values.mean().item()


def write_planted_cache(
    url: str,
    acts: torch.Tensor,
    *,
    chunk_rows: int = 256,
    layer: int = 0,
    total_tokens: int | None = None,
) -> None:
    """Write activations through the real store, as `sae harvest` would (`layer` only labels
    the cache, for tests that need two caches of the same shape; `total_tokens`: the size the
    cache is created for, more than `acts` for a harvest that stopped early)."""
    from sae.store import CacheWriter

    n, d = acts.shape
    identity = {
        "model": "planted",
        "model_revision": "none",
        "layer": layer,
        "hook": "planted",
        "d_model": d,
        "dtype": "float16",
        "context": 16,
        "tokenizer": "none",
        "dataset": "planted",
        "dataset_config": "",
        "split": "train",
        "text_column": "text",
        "seed": 0,
    }
    writer = CacheWriter(
        url,
        d_model=d,
        total_tokens=total_tokens or n,
        identity=identity,
        attrs={"planted": True},
        chunk_rows=chunk_rows,
        shard_rows=chunk_rows * 4,
    )
    with writer:
        ids = torch.arange(n, dtype=torch.int32) % 1000 + 1
        positions = torch.arange(n, dtype=torch.int32) % 16 + 1
        writer.append(acts, ids, positions)


class CrashAfter:
    """Wraps a DataSource so its train stream dies after `n` batches, like a killed run."""

    def __init__(self, source, n: int) -> None:
        self.source, self.n = source, n
        self.d_model = source.d_model
        self.n_train_tokens = source.n_train_tokens
        self.provenance = source.provenance

    def sample(self, n, seed):
        return self.source.sample(n, seed)

    def heldout(self, n):
        return self.source.heldout(n)

    def train_batches(self, batch, **kwargs):
        stream = self.source.train_batches(batch, **kwargs)
        limit = self.n

        class _Crashing:
            def __init__(self) -> None:
                self.count = 0

            def __iter__(self):
                return self

            def __next__(self):
                if self.count == limit:
                    raise KeyboardInterrupt("simulated kill")
                self.count += 1
                return next(stream)

            def cursor(self):
                return stream.cursor()

            def close(self):
                stream.close()

        return _Crashing()
