"""Turning a path or fsspec URL into a zarr store, plus atomic small-object writes beside it.

Local paths get zarr's LocalStore (atomic file replace on every write, and a real directory the
reader can memory-map); anything else goes through fsspec, whose object PUTs are atomic.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae.atomic import durable_replace
from sae.errors import SaeError


def _reject_constant(name: str) -> float:
    """NaN and ±Infinity are not JSON; Python's parser takes them (sae never writes them)."""
    raise ValueError(f"{name} is not a JSON number")


@dataclass(frozen=True)
class Location:
    """Where a cache lives: `local` is set for plain directories (enables memory-mapped reads)."""

    url: str
    local: Path | None

    def store(self, *, read_only: bool = False, durable: bool = False) -> Any:
        """The zarr store; durable: local writes are flushed to disk before they replace a file
        (the cache writer's, see durable_store.py)."""
        import zarr.storage

        if self.local is not None:
            if durable and not read_only:
                from sae.store.durable_store import DurableLocalStore

                return DurableLocalStore(self.local)
            return zarr.storage.LocalStore(self.local, read_only=read_only)
        try:
            return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)
        except (ImportError, ValueError) as err:
            raise SaeError(f"cannot open {self.url!r}: {err}") from None

    def _fs(self) -> tuple[Any, str]:
        import fsspec

        try:
            return fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as err:
            scheme = self.url.split("://", 1)[0]
            raise SaeError(
                f"cannot open {self.url!r}: {err}. For {scheme}:// install its fsspec backend "
                f"(e.g. pip install s3fs for s3://)"
            ) from None

    def read_json(self, key: str) -> dict | None:
        """The JSON object stored at `key` under the cache root, or None if absent."""
        try:
            if self.local is not None:
                raw = (self.local / key).read_bytes()
            else:
                fs, root = self._fs()
                raw = fs.cat_file(f"{root.rstrip('/')}/{key}")
        except (FileNotFoundError, KeyError):
            return None
        except (IsADirectoryError, NotADirectoryError, PermissionError) as err:
            raise SaeError(f"cannot read {self.url}/{key}: {err.strerror}") from None
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
            raise SaeError(
                f"{self.url}/{key} is not valid JSON ({err}); the cache is damaged"
            ) from None
        if not isinstance(data, dict):
            raise SaeError(f"{self.url}/{key} is not a JSON object; the cache is damaged")
        return data

    def write_json(self, key: str, data: dict) -> None:
        """Replace the object at `key` in one step: readers see the old or the new, never half."""
        raw = json.dumps(data, indent=1, allow_nan=False).encode()
        if self.local is not None:
            durable_replace(self.local / key, raw)
        else:
            fs, root = self._fs()
            fs.pipe_file(f"{root.rstrip('/')}/{key}", raw)

    def exists(self, key: str) -> bool:
        if self.local is not None:
            return (self.local / key).exists()
        fs, root = self._fs()
        return fs.exists(f"{root.rstrip('/')}/{key}")

    def is_empty(self) -> bool:
        """True when nothing exists at the location (or an empty directory)."""
        if self.local is not None:
            return not self.local.exists() or (
                self.local.is_dir() and not any(self.local.iterdir())
            )
        fs, root = self._fs()
        return not fs.exists(root) or not fs.ls(root, detail=False)

    def remove_all(self) -> None:
        """Delete the whole cache (used only for an explicit overwrite)."""
        if self.local is not None:
            import shutil

            if self.local.exists():
                shutil.rmtree(self.local)
        else:
            fs, root = self._fs()
            if fs.exists(root):
                fs.rm(root, recursive=True)

    def files(self) -> list[tuple[str, int]]:
        """(relative key, size in bytes) of every object under the cache root."""
        if self.local is not None:
            out = []
            for dirpath, _, names in os.walk(self.local):
                for name in names:
                    p = Path(dirpath) / name
                    out.append((str(p.relative_to(self.local)), p.stat().st_size))
            return out
        fs, root = self._fs()
        root = root.rstrip("/")
        found = fs.find(root, detail=True)
        return [(k[len(root) + 1 :], int(v.get("size") or 0)) for k, v in found.items()]


def locate(url: str) -> Location:
    """Parse a user-given path or URL; `file://` and bare paths become local directories."""
    if not isinstance(url, str) or not url.strip():
        raise SaeError("cache location is empty; pass a directory path or a URL like s3://b/cache")
    url = url.strip()
    if url.startswith("file://"):
        return Location(url, Path(url[len("file://") :]).expanduser().absolute())
    if "://" in url:
        return Location(url.rstrip("/"), None)
    return Location(url, Path(url).expanduser().absolute())
