"""Which source a benchmark ran: the commit every result file records.

The device machine gets a copy of the working tree whose `.git` can be older than the tree, so
the commit is taken from SAE_BENCH_COMMIT when the command sets it (pass the commit that was
sent), else from git, marked "-dirty" when the tree differs from that commit.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

COMMIT_ENV = "SAE_BENCH_COMMIT"


def source_commit() -> str:
    """SAE_BENCH_COMMIT, else `git describe --always --dirty` of this checkout, else "unknown"."""
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        return given
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
