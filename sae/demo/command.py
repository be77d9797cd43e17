"""`sae demo`: the whole product on the embedded model and text, in one command.

It runs the same commands a user would (`sae harvest`, `sae train`, `sae eval`, `sae plot`),
so the demo exercises exactly the code a Gemma-2 user runs. A rerun reuses what is finished.
"""

from __future__ import annotations

import typer


def demo(
    out: str = typer.Option("demo-out", "--out", help="Folder for the cache, runs and report."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (cuda scales it up)."),
    model: str = typer.Option(
        None, "--model", help="Causal LM (default: the embedded SmolLM2-135M GGUF)."
    ),
    layer: int = typer.Option(15, "--layer", help="Block whose output is harvested."),
    tokens: str = typer.Option(
        None, "--tokens", help="Tokens to harvest (default 80K on CPU, 4M on GPU)."
    ),
    dataset: str = typer.Option(
        "python-docs", "--dataset", help="Text: python-docs (offline), a local file/folder, or hub."
    ),
) -> None:
    """Harvest -> train HierarchicalTopK + TopK/BatchTopK baselines -> eval -> report.md."""
    import json
    import time
    from pathlib import Path

    from sae.cli import app
    from sae.demo.plan import DemoPlan, embedded_model
    from sae.demo.report import write_report
    from sae.progress import console
    from sae.runtime import resolve_device
    from sae.units import format_count, parse_count

    started = time.perf_counter()
    dev = str(resolve_device(device))
    plan = DemoPlan.for_device(
        model or embedded_model(),
        layer,
        dev,
        parse_count(tokens, name="--tokens") if tokens else None,
    )
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "cache"

    def sae_cli(*args: str) -> None:
        app(args=[str(a) for a in args], standalone_mode=False)

    console.rule(f"[bold]1/4 harvest: {format_count(plan.tokens)} tokens, layer {plan.layer}")
    if _cache_complete(cache, plan.tokens):
        console.print(f"reusing the finished cache {cache}")
    else:
        sae_cli(
            "harvest", "--model", plan.model, "--layer", plan.layer, "--tokens", plan.tokens,
            "--out", cache, "--dataset", dataset, "--context", plan.context, "--device", dev,
        )  # fmt: skip

    runs = []
    for i, spec in enumerate(plan.saes, 1):
        run = root / "runs" / spec.name
        runs.append(run)
        console.rule(f"[bold]2/4 train {i}/{len(plan.saes)}: {spec.name}")
        if (run / "summary.json").is_file():
            console.print(f"reusing the finished run {run}")
            continue
        sae_cli(
            "train", "--cache", cache, "--out", run, "--arch", spec.arch, "--k", spec.k,
            "--expansion", plan.expansion, "--batch", plan.batch,
            "--tokens", _train_tokens(cache, plan.epochs), "--device", dev,
            "--dead-tokens", "200K", "--eval-every", "0", "--overwrite",
        )  # fmt: skip

    console.rule("[bold]3/4 eval on held-out tokens")
    ks = ",".join(str(k) for k in plan.eval_ks)
    for run in runs:
        sae_cli("eval", run, "--cache", cache, "--k", ks, "--device", dev)
    console.rule("[bold]4/4 report")
    figure = root / "fvu_vs_l0.png"
    sae_cli("plot", *runs, "--out", figure)
    evals = [json.loads((run / "eval.json").read_text()) for run in runs]
    header = {
        "model": plan.model,
        "layer": f"{plan.layer} (blocks.{plan.layer}.hook_resid_post)",
        "text": dataset,
        "cache": f"{cache} ({format_count(plan.tokens)} tokens, context {plan.context})",
        "SAEs": f"{plan.expansion}× expansion, batch {plan.batch}, {plan.epochs} epoch(s)",
        "device": dev,
        "wall time": f"{time.perf_counter() - started:.0f} s",
    }
    report = write_report(root, evals, figure, header)
    console.print(f"[bold green]wrote {report}[/] and {figure}")


def _cache_complete(path, tokens: int) -> bool:
    """True when `path` holds a finished cache of `tokens` tokens (so a rerun skips harvest)."""
    if not path.exists():
        return False
    from sae.errors import SaeError
    from sae.store import open_cache

    try:
        return open_cache(str(path)).n_tokens >= tokens
    except SaeError:
        return False


def _train_tokens(cache, epochs: int) -> int:
    """Tokens for `epochs` passes over the cache's train split."""
    from sae.store import open_cache

    c = open_cache(str(cache))
    start, stop = c.heldout_rows
    return max(1, epochs * (c.n_tokens - (stop - start)))
