"""`sae export RUN OUT`: a trained SAE as a folder other tools load (SAELens) or ours (`sae`)."""

from __future__ import annotations

import typer

FORMATS = ("saelens", "sae")


def export_command(
    run: str = typer.Argument(
        ..., help="Run directory of `sae train` (or an exported `sae` folder)."
    ),
    out: str = typer.Argument(..., help="Folder to write."),
    format: str = typer.Option("saelens", "--format", help="saelens | sae."),
    k: int = typer.Option(
        None,
        "--k",
        help="Top-k budget to export (default: the training k). BatchTopK with --k exports as "
        "top-k instead of its threshold.",
    ),
    dataset: str = typer.Option("", "--dataset", help="Dataset path recorded in SAELens metadata."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files already in OUT."),
) -> None:
    """Export a trained SAE: SAELens' cfg.json + sae_weights.safetensors, or our own format."""
    from pathlib import Path

    from sae.errors import SaeError
    from sae.train.model import load_sae

    if format not in FORMATS:
        raise SaeError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise SaeError(f"{out} exists and is not a folder; choose another OUT")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise SaeError(f"{out} is not empty; choose an empty OUT or pass --overwrite")
    if Path(run).resolve() == target.resolve():
        raise SaeError("OUT must differ from RUN")
    sae = load_sae(run)
    if format == "saelens":
        from sae.eval.frequency import FREQUENCY_FILE, read_frequency
        from sae.export.saelens import (
            saelens_architecture,
            saelens_setting,
            write_saelens,
        )

        label = saelens_setting(sae, saelens_architecture(sae.cfg.arch, k), k)
        freq_path = Path(run) / FREQUENCY_FILE
        found = read_frequency(freq_path, label, sae.cfg.n_latents) if freq_path.is_file() else None
        write_saelens(sae, target, k=k, dataset=dataset, frequency=found[0] if found else None)
        how = "SAELens: sae_lens.SAE.load_from_disk(path)"
        if found:
            typer.echo(f"sparsity.safetensors: {label} firing frequencies over {found[1]} rows")
        else:
            typer.echo(
                f"no sparsity.safetensors: {freq_path} has no {label} frequencies; run "
                f"`sae eval {run} --cache CACHE` first to include them"
            )
    else:
        from sae.export.native import write_native

        write_native(sae, target, k=k)
        how = "sae: sae.load(path)"
    typer.echo(f"wrote {target} ({how})")
