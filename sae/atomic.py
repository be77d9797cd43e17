"""Whole-file writes that a reader (or a resumed run) never sees half done.

Write to a sibling temporary name, then rename over the target: a killed process leaves either
the old file or the new one, plus at most a stray `.tmp` that the next write replaces.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(path.name + TMP_SUFFIX)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call write(temporary path), then rename it over `path`."""
    path = Path(path)
    tmp = tmp_path(path)
    write(tmp)
    tmp.replace(path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))
