"""The activation store: a Zarr v3 cache format, a crash-safe writer and a shuffled reader.

See docs/store-format.md for the on-disk format. Names are imported lazily so that the CLI,
which imports `sae.store.command`, does not pay for zarr and torch at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sae.store.layout import FORMAT_VERSION

if TYPE_CHECKING:
    from sae.store.cache import Cache, open_cache
    from sae.store.stream import BatchStream
    from sae.store.writer import CacheWriter

__all__ = ["FORMAT_VERSION", "BatchStream", "Cache", "CacheWriter", "open_cache"]

_WHERE = {
    "Cache": "sae.store.cache",
    "open_cache": "sae.store.cache",
    "BatchStream": "sae.store.stream",
    "CacheWriter": "sae.store.writer",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'sae.store' has no attribute {name!r}")
