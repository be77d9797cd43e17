"""`sae harvest`: placeholder until its issue lands (it already parses --tokens)."""

from __future__ import annotations

import typer

from sae.errors import NotImplementedYet
from sae.units import parse_count


def harvest(
    tokens: str = typer.Option(
        "1e9", "--tokens", help="Tokens to harvest: 1e9, 500M, 2B, 1_000_000."
    ),
) -> None:
    """Not implemented yet."""
    parse_count(tokens, name="--tokens")
    raise NotImplementedYet("'sae harvest' is not implemented yet")
