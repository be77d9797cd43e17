"""Which share of the work this process does, read from torchrun's environment (RANK, WORLD_SIZE).

No process group is needed: each rank packs the same window sequence, keeps windows
``i % world_size == rank`` and writes its own part of the cache through the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sae.errors import SaeError


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SaeError(f"environment variable {name}={value!r} is not an integer") from None


def rank_info() -> RankInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (a plain run is rank 0 of 1)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise SaeError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent")
    return RankInfo(rank, world, local)
