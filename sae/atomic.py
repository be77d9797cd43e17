"""Whole-file writes that a reader (or a resumed run) never sees half done.

Write to a sibling temporary name, flush it, then rename over the target: a killed process (or a
power cut) leaves either the old file or the new one, plus at most a stray `.tmp` that the next
write replaces.
"""

from __future__ import annotations

import os
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
    """Flush the files root/key, the folders that name them and the folders above those (which
    name folders made for them) to disk: after this, a power cut keeps them as they are now (a
    rename, or a new folder, is durable only once the folder holding its name is synced)."""
    folders: list[Path] = []
    for key in keys:
        path = root / key
        _fsync_path(path)
        for folder in (path.parent, path.parent.parent):
            if folder not in folders:
                folders.append(folder)
    if os.name == "posix":  # folders cannot be opened for fsync elsewhere (Windows)
        for folder in folders:
            _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
