"""`sae store info|verify`: placeholders until the store issue lands."""

from __future__ import annotations

import typer

from sae.errors import NotImplementedYet

store_app = typer.Typer(no_args_is_help=True)


@store_app.command("info")
def info(path: str = typer.Argument(..., help="Cache path or fsspec URL.")) -> None:
    """Show what a cache holds."""
    raise NotImplementedYet("'sae store info' is not implemented yet")


@store_app.command("verify")
def verify(path: str = typer.Argument(..., help="Cache path or fsspec URL.")) -> None:
    """Re-read every chunk and check checksums and metadata."""
    raise NotImplementedYet("'sae store verify' is not implemented yet")
