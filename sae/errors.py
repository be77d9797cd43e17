"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class SaeError(Exception):
    """A problem the user can fix (bad input, foreign cache, missing file); never a bug.

    The message must say what is wrong and what to do about it.
    """

    exit_code = 2


class NotImplementedYet(SaeError):
    """A subcommand whose issue has not landed yet."""
