"""`sae demo`: placeholder until its issue lands."""

from __future__ import annotations

from sae.errors import NotImplementedYet


def demo() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("'sae demo' is not implemented yet")
