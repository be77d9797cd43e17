"""`sae export`: placeholder until its issue lands."""

from __future__ import annotations

from sae.errors import NotImplementedYet


def export_command() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("'sae export' is not implemented yet")
