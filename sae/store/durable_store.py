"""A zarr LocalStore whose writes replace their files atomically and durably.

The writer rewrites token and position chunks that already hold committed rows (each chunk spans
several shards). zarr's own LocalStore writes such a file in place in some versions (3.0.x) and
renames an unsynced temporary file in others, so a killed process, or a power cut, could take
committed rows back; and the cache's metadata files were never flushed at all. Every write
here goes through `durable_replace` instead: temporary file, fsync, rename. The rename itself
becomes durable when the writer syncs the folder before its commit record counts the rows
(`fsync_files`).
"""

from __future__ import annotations

import asyncio

import zarr.storage

from sae.atomic import durable_replace


class DurableLocalStore(zarr.storage.LocalStore):
    async def set(self, key: str, value) -> None:  # value: zarr Buffer
        await asyncio.to_thread(self.set_sync, key, value)

    def set_sync(self, key: str, value) -> None:
        """The blocking form (newer zarr has one, and may write chunks through it)."""
        if self.read_only:
            raise ValueError(f"cannot write {key!r}: the store was opened read-only")
        durable_replace(self.root / key, value.as_buffer_like())
