"""The `sae` command line: one typer app whose subcommands live next to the code they drive.

Each component keeps its command in `sae/<component>/command.py`; those modules import only
light things at module level so that `sae --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

from sae.demo.command import demo
from sae.errors import SaeError
from sae.eval.command import eval_command, plot_command
from sae.export.command import export_command
from sae.harvest.command import harvest
from sae.store.command import store_app
from sae.train.command import train

app = typer.Typer(
    name="sae",
    help=(
        "Harvest a language model's residual stream into a Zarr v3 activation cache, "
        "then train HierarchicalTopK sparse autoencoders (and TopK, BatchTopK, JumpReLU baselines) on it."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command(
    "harvest", help="Run a causal LM over text and write a layer's residual stream to a cache."
)(harvest)
app.command("train", help="Train an SAE from an activation cache.")(train)
app.command("eval", help="Measure a trained SAE on a cache's held-out tokens.")(eval_command)
app.command("plot", help="Plot FVU vs l0 (and dead latents) for one or more evaluated runs.")(
    plot_command
)
app.command("export", help="Export a trained SAE (e.g. in SAELens' format).")(export_command)
app.add_typer(store_app, name="store", help="Inspect and verify activation caches.")
app.command("demo", help="End to end on the embedded model and text: cache -> SAEs -> report.")(
    demo
)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app(args=argv, standalone_mode=True)
    except SaeError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        sys.exit(130)
