"""`sae eval` and `sae plot`: placeholders until their issue lands."""

from __future__ import annotations

from sae.errors import NotImplementedYet


def eval_command() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("'sae eval' is not implemented yet")


def plot_command() -> None:
    """Not implemented yet."""
    raise NotImplementedYet("'sae plot' is not implemented yet")
