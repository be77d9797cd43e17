"""`sae demo`: the whole product on the embedded model and text, in one command.

It runs the same commands a user would (`sae harvest`, `sae train`, `sae eval`, `sae plot`),
so the demo exercises exactly the code a Gemma-2 user runs. A rerun with the same settings
reuses what is finished (and resumes an interrupted harvest); one with other settings is refused
instead of mixing its results with the earlier demo's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from sae.demo.plan import DemoPlan
    from sae.store import Cache

FIGURE_FILE = "fvu_vs_l0.png"
DEAD_TOKENS = 200_000


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
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Start over: replace the cache, runs and report an earlier demo left in --out.",
    ),
) -> None:
    """Harvest -> train HierarchicalTopK + TopK/BatchTopK baselines -> eval -> report.md."""
    import json
    import time

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
    cache = root / "cache"
    runs = {spec.name: root / "runs" / spec.name for spec in plan.saes}
    if overwrite:
        _remove_runs_and_report(root, list(runs.values()))
    else:
        _refuse_other_settings(root, plan, dataset, train_tokens=None)
    root.mkdir(parents=True, exist_ok=True)

    console.rule(f"[bold]1/4 harvest: {format_count(plan.tokens)} tokens, layer {plan.layer}")
    found = None if overwrite else _existing_cache(cache)
    if found is not None and found.n_tokens >= plan.tokens:
        console.print(f"reusing the finished cache {cache}")
    else:
        run_stage(
            "harvest", "--model", plan.model, "--layer", plan.layer, "--tokens", plan.tokens,
            "--out", cache, "--dataset", dataset, "--context", plan.context, "--device", dev,
            *(["--overwrite"] if overwrite else []),
        )  # fmt: skip

    train_tokens = _train_tokens(cache, plan.epochs)
    _refuse_other_settings(root, plan, dataset, train_tokens=train_tokens)
    for i, spec in enumerate(plan.saes, 1):
        run = runs[spec.name]
        console.rule(f"[bold]2/4 train {i}/{len(plan.saes)}: {spec.name}")
        if (run / "summary.json").is_file():
            console.print(f"reusing the finished run {run}")
            continue
        run_stage(
            "train", "--cache", cache, "--out", run, "--arch", spec.arch, "--k", spec.k,
            "--expansion", plan.expansion, "--batch", plan.batch, "--tokens", train_tokens,
            "--device", dev, "--dead-tokens", DEAD_TOKENS, "--eval-every", "0", "--overwrite",
        )  # fmt: skip

    console.rule("[bold]3/4 eval on held-out tokens")
    ks = ",".join(str(k) for k in plan.eval_ks)
    for run in runs.values():
        run_stage("eval", run, "--cache", cache, "--k", ks, "--device", dev)
    console.rule("[bold]4/4 report")
    figure = root / FIGURE_FILE
    run_stage("plot", *runs.values(), "--out", figure)
    evals = [json.loads((run / "eval.json").read_text()) for run in runs.values()]
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


def run_stage(command: str, *args: Any) -> None:
    """Run `sae COMMAND ARGS...` in this process and stop the demo when it did not succeed.

    Outside standalone mode typer turns a Ctrl-C inside the command into a returned 130, and a
    command that ends with `typer.Exit(n)` returns n: neither may let the demo carry on with
    a partial cache or a missing run.
    """
    from sae.cli import app
    from sae.errors import SaeError

    code = app(args=[*command.split(), *(str(a) for a in args)], standalone_mode=False)
    if code == 130:
        typer.secho(
            f"interrupted in `sae {command}`; rerun the same demo command to continue", err=True
        )
        raise KeyboardInterrupt
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        raise SaeError(
            f"`sae {command}` failed with exit code {code} (see its output above); "
            "the demo stopped there"
        )


def _existing_cache(path: Path) -> Cache | None:
    """The cache at `path`, or None when there is none to compare (absent, or cut short before
    its metadata: `sae harvest` resumes or restarts such a one itself)."""
    if not path.exists():
        return None
    from sae.errors import SaeError
    from sae.store import open_cache

    try:
        return open_cache(str(path))
    except SaeError:
        return None


def _refuse_other_settings(
    root: Path, plan: DemoPlan, dataset: str, train_tokens: int | None
) -> None:
    """SaeError when the cache or a run in `root` was made with settings other than `plan`'s.

    Reusing them would report this demo's settings over the earlier demo's results. Before the
    harvest `train_tokens` is None (it depends on the cache): the runs' other settings are
    checked then, so that a mismatch is refused before any work.
    """
    from sae.errors import SaeError
    from sae.train.config import TrainConfig

    found: list[tuple[str, str, Any, Any]] = []  # (where, setting, there, now)
    cache = _existing_cache(root / "cache")
    if cache is not None:
        there = {
            "model": cache.model,
            "layer": cache.layer,
            "context": cache.context,
            "text": cache.identity.get("dataset"),
            "tokens": cache.layout.total_tokens,
        }
        now = {
            "model": plan.model,
            "layer": plan.layer,
            "context": plan.context,
            "text": dataset,
            "tokens": plan.tokens,
        }
        found += [("cache", key, there[key], now[key]) for key in now if there[key] != now[key]]
    for spec in plan.saes:
        config = root / "runs" / spec.name / "config.json"
        if not config.is_file():
            continue
        saved = TrainConfig.read(config)
        now = {
            "model": plan.model,
            "layer": plan.layer,
            "context": plan.context,
            "arch": spec.arch,
            "k": spec.k,
            "expansion": plan.expansion,
            "batch": plan.batch,
            "dead_tokens": DEAD_TOKENS,
        }
        if train_tokens is not None:
            now["train tokens"] = train_tokens
        names = {"train tokens": "tokens"}  # the demo's name for a TrainConfig field
        found += [
            (f"runs/{spec.name}", key, saved.get(names.get(key, key)), value)
            for key, value in now.items()
            if saved.get(names.get(key, key)) != value
        ]
    if not found:
        return
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for where, key, there, now in found:
        grouped.setdefault((key, _show(there), _show(now)), []).append(where)
    differences = "; ".join(
        f"{key} {there} there, {now} now ({', '.join(wheres)})"
        for (key, there, now), wheres in grouped.items()
    )
    raise SaeError(
        f"{root} holds a demo made with other settings: {differences}. Pass a new --out, or "
        "--overwrite to replace that demo's cache, runs and report"
    )


def _show(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _remove_runs_and_report(root: Path, runs: list[Path]) -> None:
    """--overwrite: remove the demo's own runs, figure and report (only those names).

    The cache goes in `sae harvest --overwrite`, which refuses to delete anything but a cache.
    """
    import shutil

    from sae.demo.report import REPORT_FILE
    from sae.errors import SaeError

    for run in runs:
        if run.is_dir() and any(run.iterdir()) and not (run / "config.json").is_file():
            raise SaeError(
                f"{run} is not a run the demo trained (no config.json); refusing to delete it "
                "for --overwrite. Move it away or pass a new --out"
            )
    for run in runs:
        if run.is_dir():
            shutil.rmtree(run)
    for name in (REPORT_FILE, FIGURE_FILE):
        (root / name).unlink(missing_ok=True)


def _train_tokens(cache: Path, epochs: int) -> int:
    """Tokens for `epochs` passes over the cache's train split."""
    from sae.store import open_cache

    c = open_cache(str(cache))
    start, stop = c.heldout_rows
    return max(1, epochs * (c.n_tokens - (stop - start)))
