"""`sae harvest`: the CLI front of sae.harvest (heavy imports happen inside the function)."""

from __future__ import annotations

import typer

from sae.harvest.config import DEFAULT_DATASET, DEFAULT_DATASET_CONFIG, DEFAULT_MODEL, HarvestConfig
from sae.units import parse_count


def harvest(
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", help="Hub id, local folder, or a .gguf file of a causal LM."
    ),
    layer: int = typer.Option(
        12,
        "--layer",
        help="Harvest the residual stream after block LAYER (0-based) = hidden_states[LAYER+1] "
        "= blocks.LAYER.hook_resid_post.",
    ),
    tokens: str = typer.Option(
        "1e9", "--tokens", help="Tokens to harvest: 1e9, 500M, 2B, 1_000_000."
    ),
    out: str = typer.Option("store", "--out", help="Cache location: a path or an fsspec URL."),
    dataset: str = typer.Option(
        DEFAULT_DATASET,
        "--dataset",
        help="Hub dataset (streamed), a local .jsonl/.parquet/.txt file or folder, or "
        "'python-docs' (offline: docstrings of the installed Python packages).",
    ),
    dataset_config: str | None = typer.Option(
        None, "--config", help=f"Dataset config (default {DEFAULT_DATASET_CONFIG} for FineWeb)."
    ),
    split: str = typer.Option("train", "--split", help="Dataset split."),
    text_column: str = typer.Option("text", "--text-column", help="Column holding the text."),
    context: int = typer.Option(
        1024, "--context", help="Tokens per window (each starts with BOS)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    revision: str | None = typer.Option(None, "--revision", help="Model revision on the hub."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing cache."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    chunk_rows: int | None = typer.Option(None, "--chunk-rows", hidden=True),
    shard_rows: int | None = typer.Option(None, "--shard-rows", hidden=True),
) -> None:
    """Run a causal LM over text and write one layer's residual stream to an activation cache.

    Re-running the same command resumes an interrupted harvest. With torchrun
    (`torchrun --nproc-per-node N -m sae harvest ...`) every rank writes its share of one cache.
    """
    count = parse_count(tokens, name="--tokens")
    if dataset_config is None and dataset == DEFAULT_DATASET:
        dataset_config = DEFAULT_DATASET_CONFIG
    config = HarvestConfig(
        model=model,
        layer=layer,
        tokens=count,
        out=out,
        dataset=dataset,
        dataset_config=dataset_config,
        split=split,
        text_column=text_column,
        context=context,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        revision=revision,
        overwrite=overwrite,
        progress=progress,
        chunk_rows=chunk_rows,
        shard_rows=shard_rows,
    )
    from sae.harvest.pipeline import run_harvest
    from sae.harvest.report import print_report

    print_report(run_harvest(config))
