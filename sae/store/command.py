"""`sae store info|verify`: what a cache holds, and whether every chunk is intact."""

from __future__ import annotations

import typer

store_app = typer.Typer(no_args_is_help=True)


@store_app.command("info")
def info(path: str = typer.Argument(..., help="Cache path or fsspec URL.")) -> None:
    """Show what a cache holds: model, layer, tokens, size on disk, chunks, files, statistics."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from sae.store.cache import open_cache
    from sae.units import format_bytes, format_count

    cache = open_cache(path)
    lay = cache.layout
    files = cache.loc.files()
    stats = cache.stats
    ident = cache.identity
    table = Table(title=f"sae cache {cache.url}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("model", f"{ident.get('model')} @ {ident.get('model_revision') or 'main'}"),
        ("layer / hook", f"{ident.get('layer')} / {ident.get('hook')}"),
        (
            "dataset",
            f"{ident.get('dataset')} {ident.get('dataset_config') or ''} [{ident.get('split')}]",
        ),
        ("context", str(ident.get("context"))),
        (
            "tokens",
            f"{format_count(cache.n_tokens)} committed of {format_count(lay.total_tokens)} "
            f"({cache.n_tokens:,} / {lay.total_tokens:,})",
        ),
        ("d_model / dtype", f"{lay.d_model} / float16"),
        ("writers", ", ".join(f"rank {r.rank}: {r.committed:,}" for r in cache.records)),
        ("held-out rows", "[{}, {})".format(*cache.heldout_rows)),
        (
            "chunks",
            f"{lay.n_chunks:,} of {lay.chunk_rows} rows, in {lay.n_shards:,} shards of "
            f"{lay.shard_rows} rows",
        ),
        ("compression", str(cache.attrs.get("compression") or "none") + " + crc32c"),
        ("files / size on disk", f"{len(files):,} / {format_bytes(sum(s for _, s in files))}"),
        ("mean sq. norm", f"{stats['mean_sq_norm']:.4g}"),
        ("max |x|", f"{stats['max_abs']:.4g}"),
        ("|mean| (max over dims)", f"{float(abs(stats['mean']).max()):.4g}"),
        ("non-finite / overflow", f"{stats['nonfinite']:,} / {stats['overflow']:,}"),
        (
            "format / tool",
            f"v{cache.attrs.get('format_version')} / sae {cache.attrs.get('tool_version')}",
        ),
        ("created", str(cache.attrs.get("created"))),
    ]
    for k, v in rows:
        table.add_row(k, escape(v))  # values come from the cache: never rich markup
    Console().print(table)


@store_app.command("verify")
def verify(path: str = typer.Argument(..., help="Cache path or fsspec URL.")) -> None:
    """Re-read every chunk and check checksums and metadata; exit 1 if anything is corrupted."""
    from sae.progress import make_progress
    from sae.store.cache import open_cache
    from sae.store.verify import committed_chunks, verify_cache

    cache = open_cache(path)
    with make_progress("chunk") as progress:
        task = progress.add_task("verify", total=len(committed_chunks(cache)))
        report = verify_cache(cache, lambda n: progress.advance(task, n))
    for line in report.problems:
        typer.echo(line)
    if report.corrupted:
        typer.echo(f"corrupted chunks: {', '.join(map(str, report.corrupted))}")
    if not report.ok:
        typer.secho(f"FAILED: {cache.url} has problems (see above)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"OK: {report.chunks_checked} chunks of {cache.n_tokens:,} committed rows verified")
