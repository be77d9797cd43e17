"""Where rows live in a cache: chunk/shard sizes, each writer's row range, the held-out range.

Everything here is pure arithmetic on the cache's fixed layout so that writers and readers on
different machines agree on it without talking to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from sae.errors import SaeError

FORMAT_NAME = "sae-activation-cache"
FORMAT_VERSION = 1

ACTIVATIONS = "activations"
TOKEN_IDS = "token_ids"
POSITIONS = "positions"
WRITERS = "writers"

# Measured choice (docs/store-format.md): ~8 MiB inner chunks, 32 chunks per shard file.
TARGET_CHUNK_BYTES = 8 * 2**20
CHUNKS_PER_SHARD = 32
# token_ids/positions chunks span this many activation shards; writer ranges align to it so two
# writers never rewrite the same token chunk.
SHARDS_PER_TOKEN_CHUNK = 16
HELDOUT_FRACTION = 0.01
# What a cache's metadata may claim (checked on reading: the metadata is untrusted input)
MAX_D_MODEL = 1 << 17
MAX_TOKENS = 1 << 48
MAX_WRITERS = 100_000  # record keys have five digits
MAX_CHUNK_BYTES = 1 << 30
MAX_SHARD_BYTES = 1 << 34
FP16_MAX = 65504.0
MIN_CHUNK_ROWS = 16  # the smallest chunk the defaults shrink to for a small multi-writer cache


def _pow2_near(x: float) -> int:
    p = 1
    while p * 2 <= x * 1.5:
        p *= 2
    return p


def _pow2_below(x: int) -> int:
    """The largest power of two <= x (x >= 1)."""
    return 1 << (max(1, x).bit_length() - 1)


def default_chunk_rows(d_model: int) -> int:
    """Rows per inner chunk: the power of two whose float16 chunk is closest to 8 MiB."""
    return max(16, _pow2_near(TARGET_CHUNK_BYTES / (2 * d_model)))


@dataclass(frozen=True)
class Layout:
    """Fixed geometry of one cache (all writers together)."""

    total_tokens: int
    d_model: int
    chunk_rows: int
    shard_rows: int
    world_size: int

    @property
    def token_chunk_rows(self) -> int:
        return self.shard_rows * SHARDS_PER_TOKEN_CHUNK

    @property
    def n_chunks(self) -> int:
        return -(-self.total_tokens // self.chunk_rows)

    @property
    def n_shards(self) -> int:
        return -(-self.total_tokens // self.shard_rows)

    def rank_rows(self, rank: int) -> int:
        lo, hi = self.rank_range(rank)
        return hi - lo

    def rank_range(self, rank: int) -> tuple[int, int]:
        """Physical rows [start, stop) that writer `rank` owns; token-chunk aligned, disjoint."""
        unit = self.token_chunk_rows
        n_units = -(-self.total_tokens // unit)
        lo = n_units * rank // self.world_size
        hi = n_units * (rank + 1) // self.world_size
        return min(lo * unit, self.total_tokens), min(hi * unit, self.total_tokens)

    @property
    def heldout_rows(self) -> int:
        """Rows [0, H) held out for evaluation: ~1% of the cache, whole chunks, inside rank 0."""
        chunk = self.chunk_rows
        wanted = -(-max(1, round(self.total_tokens * HELDOUT_FRACTION)) // chunk) * chunk
        _, stop0 = self.rank_range(0)
        cap = stop0 // 2 // chunk * chunk or stop0 // 2  # never more than half of rank 0's rows
        return min(wanted, cap)

    def to_attrs(self) -> dict:
        return {
            "total_tokens": self.total_tokens,
            "d_model": self.d_model,
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
            "token_chunk_rows": self.token_chunk_rows,
            "world_size": self.world_size,
            "heldout_rows": self.heldout_rows,
        }


def make_layout(
    total_tokens: int,
    d_model: int,
    world_size: int,
    chunk_rows: int | None,
    shard_rows: int | None,
) -> Layout:
    """Validate the caller's sizes and fill in the defaults chosen for 1e9 x 2304 caches."""
    for name, value in (("total_tokens", total_tokens), ("d_model", d_model)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SaeError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise SaeError(f"world_size must be a positive integer, got {world_size!r}")
    # Writers own whole token chunks (SHARDS_PER_TOKEN_CHUNK shards): each needs at least one,
    # and rank 0's first rows are the held-out split. Defaults shrink until every writer has one
    # (chunks of at least MIN_CHUNK_ROWS, so the held-out split keeps rows besides position 0).
    per_writer = total_tokens // (world_size * SHARDS_PER_TOKEN_CHUNK)  # most rows per shard
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(d_model)
        if shard_rows is None and world_size > 1 and per_writer < chunk_rows:
            chunk_rows = max(MIN_CHUNK_ROWS, _pow2_below(per_writer))
    if shard_rows is None:
        shard_rows = chunk_rows * CHUNKS_PER_SHARD
        if world_size > 1 and shard_rows > per_writer:
            shard_rows = max(1, per_writer // chunk_rows) * chunk_rows
    if chunk_rows <= 0 or shard_rows <= 0 or shard_rows % chunk_rows:
        raise SaeError(
            f"shard_rows ({shard_rows}) must be a positive multiple of chunk_rows ({chunk_rows})"
        )
    if shard_rows > total_tokens:
        # A tiny cache needs no shard bigger than itself (keeps small caches small on disk).
        chunk_rows = min(chunk_rows, total_tokens)
        shard_rows = -(-total_tokens // chunk_rows) * chunk_rows
    return Layout(total_tokens, d_model, chunk_rows, shard_rows, world_size)


def check_every_writer_has_rows(layout: Layout) -> None:
    """Refuse to create a cache where some writer owns no rows (writer 0 would leave it without
    a held-out split). Only for new caches: one made by an older sae still opens and resumes."""
    empty = [r for r in range(layout.world_size) if not layout.rank_rows(r)]
    if empty:
        least = (layout.world_size - 1) * layout.token_chunk_rows + 1
        raise SaeError(
            f"{layout.total_tokens} tokens over {layout.world_size} writers leave writer(s) "
            f"{empty} without rows: each takes whole token chunks of {layout.token_chunk_rows} "
            f"rows ({SHARDS_PER_TOKEN_CHUNK} shards of {layout.shard_rows}); harvest at least "
            f"{least} tokens, use fewer ranks, or pass smaller --shard-rows/--chunk-rows"
        )


def layout_from_attrs(attrs: dict) -> Layout:
    """Rebuild (and sanity-check) the layout stored in a cache's group attributes."""
    try:
        values = {k: attrs[k] for k in ("total_tokens", "d_model", "chunk_rows", "shard_rows")}
        values["world_size"] = attrs["world_size"]
    except KeyError as err:
        raise SaeError(
            f"cache attributes lack {err.args[0]!r}; the cache metadata is damaged"
        ) from None
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SaeError(f"cache attribute {key}={value!r} is not a positive integer")
    if values["shard_rows"] % values["chunk_rows"]:
        raise SaeError("cache attribute shard_rows is not a multiple of chunk_rows")
    # Sizes a reader allocates or loops over: bounded, so damaged or hostile metadata fails
    # here instead of hanging or asking for terabytes
    total, chunk = values["total_tokens"], values["chunk_rows"]
    limits = (
        ("d_model", values["d_model"], MAX_D_MODEL),
        ("total_tokens", total, MAX_TOKENS),
        ("world_size", values["world_size"], MAX_WRITERS),
        ("chunk bytes", chunk * values["d_model"] * 2, MAX_CHUNK_BYTES),
        ("shard bytes", values["shard_rows"] * values["d_model"] * 2, MAX_SHARD_BYTES),
        ("shard_rows", values["shard_rows"], -(-total // chunk) * chunk),
    )
    for key, value, limit in limits:
        if value > limit:
            raise SaeError(
                f"cache attribute {key}={value} exceeds {limit}; the metadata is damaged"
            )
    return Layout(**values)
