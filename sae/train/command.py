"""`sae train`: placeholder until its issue lands."""

from __future__ import annotations

from sae.errors import NotImplementedYet


def train() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("'sae train' is not implemented yet")
