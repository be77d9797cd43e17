"""Whole-file writes that a reader (or a resumed run) never sees half done.

Write to a sibling temporary name, flush it, then rename over the target: a killed process (or a
power cut) leaves either the old file or the new one, plus at most a stray `.tmp` that the next
write replaces.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(path.name + TMP_SUFFIX)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call write(temporary path), flush it to disk, then rename it over `path` (so a power cut
    leaves the old file or the whole new one, never a renamed empty one)."""
    path = Path(path)
    tmp = tmp_path(path)
    write(tmp)
    _fsync_path(tmp)
    tmp.replace(path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def fsync_files(root: Path, keys: Iterable[str]) -> None:
    """Flush the files root/key and every folder from theirs up to root to disk: after this, a
    power cut keeps them as they are now (a rename, or a new folder, is durable only once the
    folder holding its name is synced)."""
    folders: list[Path] = []
    for key in keys:
        _fsync_path(root / key)
        parts = key.split("/")[:-1]
        for depth in range(len(parts), -1, -1):
            folder = root.joinpath(*parts[:depth])
            if folder not in folders:
                folders.append(folder)
    if os.name == "posix":  # folders cannot be opened for fsync elsewhere (Windows)
        for folder in folders:
            _fsync_path(folder)


def durable_replace(path: Path, data: object) -> None:
    """Replace `path` with the bytes of `data` (any buffer), flushed to disk before the rename:
    a killed process or a power cut leaves the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_path(path: Path) -> None:
    # Windows flushes only through a handle opened for writing; POSIX folders open read-only.
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
