"""`sae train`: fill a TrainConfig from the command line and run the trainer.

Heavy imports (torch, zarr) happen inside the function so `sae --help` stays fast.
"""

from __future__ import annotations

import typer

from sae.units import parse_count


def train(
    cache: str = typer.Option(..., "--cache", help="Activation cache written by `sae harvest`."),
    out: str = typer.Option(..., "--out", help="Run directory (weights, config, metrics)."),
    k: int = typer.Option(128, "--k", help="Active latents per token (K for hierarchical)."),
    arch: str = typer.Option(
        "hierarchical", "--arch", help="hierarchical | topk | batchtopk | jumprelu."
    ),
    latents: str = typer.Option(
        None, "--latents", help="Dictionary size, e.g. 65536 or 64K (default 65536)."
    ),
    expansion: int = typer.Option(None, "--expansion", help="Dictionary size as d_model × this."),
    loss_every: int = typer.Option(
        1, "--loss-every", help="Hierarchical loss on prefixes {1} ∪ {m, 2m, …} (paper §3.4)."
    ),
    lr: float = typer.Option(8e-4, "--lr", help="Adam learning rate."),
    warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps."),
    decay: float = typer.Option(
        0.0, "--decay", help="Decay lr linearly to 0 over this last fraction of the run."
    ),
    batch: int = typer.Option(4096, "--batch", help="Tokens per step (all ranks together)."),
    tokens: str = typer.Option(
        None, "--tokens", help="Tokens to train on, e.g. 1e9 (default: the cache once)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and data order."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dead_tokens: str = typer.Option(
        "10M", "--dead-tokens", help="A latent is dead after this many tokens without firing."
    ),
    aux_k: int = typer.Option(512, "--aux-k", help="AuxK: dead latents used per token."),
    aux_coef: float = typer.Option(1 / 32, "--aux-coef", help="AuxK loss coefficient."),
    l0_coef: float = typer.Option(1e-3, "--l0-coef", help="JumpReLU L0 penalty coefficient."),
    bandwidth: float = typer.Option(
        1e-3, "--bandwidth", help="JumpReLU straight-through kernel width."
    ),
    eval_every: int = typer.Option(
        500, "--eval-every", help="Held-out eval every N steps (0: only at the end)."
    ),
    eval_tokens: str = typer.Option("64K", "--eval-tokens", help="Held-out tokens per eval."),
    log_every: int = typer.Option(50, "--log-every", help="Log metrics every N steps."),
    checkpoint_every: int = typer.Option(
        2000, "--checkpoint-every", help="Write a resumable checkpoint every N steps."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    deterministic: bool = typer.Option(
        False, "--deterministic", help="Bitwise-repeatable runs (GPU kernels a little slower)."
    ),
    read_workers: int = typer.Option(
        1,
        "--read-workers",
        help="Cache reader threads: 1 keeps up with an H100 or H200 from a warm local cache; "
        "more for cold disks or remote caches.",
    ),
    encoder_dtype: str = typer.Option(
        "bfloat16",
        "--encoder-dtype",
        help="Encoder matmul precision on CUDA: bfloat16 (autocast; the step is about 2.5x faster "
        "at Gemma-2-2B shape) or float32. CPU runs always use float32.",
    ),
    adam_state: str = typer.Option(
        "float32",
        "--adam-state",
        help="Adam moments: float32, or bfloat16 (stochastic rounding; half the optimiser "
        "memory, about 0.6-0.7 ms less per step at Gemma-2-2B shape). May change on --resume.",
    ),
) -> None:
    """Train a sparse autoencoder on a cache's train split; evaluate on its held-out split."""
    import json
    import os

    from sae.train.config import TrainConfig
    from sae.train.trainer import train as run_training

    cfg = TrainConfig(
        cache=cache,
        out=out,
        k=k,
        arch=arch,
        n_latents=None if latents is None else parse_count(latents, name="--latents"),
        expansion=expansion,
        loss_every=loss_every,
        lr=lr,
        warmup_steps=warmup,
        decay_fraction=decay,
        batch=batch,
        tokens=None if tokens is None else parse_count(tokens, name="--tokens"),
        seed=seed,
        device=device,
        dead_tokens=parse_count(dead_tokens, name="--dead-tokens"),
        aux_k=aux_k,
        aux_coef=aux_coef,
        l0_coef=l0_coef,
        jumprelu_bandwidth=bandwidth,
        eval_every=eval_every,
        eval_tokens=parse_count(eval_tokens, name="--eval-tokens"),
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        deterministic=deterministic,
        encoder_dtype=encoder_dtype,
        adam_state=adam_state,
        read_workers=read_workers,
    )
    ignored = cfg.ignored_options()
    if ignored and os.environ.get("RANK", "0") == "0":
        typer.echo(f"note: --arch {cfg.arch} does not use {', '.join(ignored)}", err=True)
    summary = run_training(cfg)
    keys = ("steps", "tokens", "fvu", "l0", "dead", "tokens_per_s")
    if os.environ.get("RANK", "0") == "0":  # one summary line per job, not per rank
        typer.echo(json.dumps({key: summary.get(key) for key in keys}))
