"""`sae eval` end to end: check the cache belongs to the SAE, stream its held-out rows, splice.

The command module only parses options; everything that touches torch, the store or a model is
here, so it can be driven from Python (and tests) without the CLI.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from sae.atomic import atomic_write_text
from sae.errors import SaeError
from sae.eval.evaluate import EvalPlan, EvalResult, Setting, evaluate_sae
from sae.store.layout import HELDOUT_FRACTION

EVAL_FILE = "eval.json"


def check_cache_matches(sae_cfg, cache, run: str, *, any_model: bool = False) -> None:
    """Refuse a cache harvested from another model, layer or width than the SAE's inputs.

    Models are compared by the name the harvest was given, so a local copy of the SAE's model
    (a folder or .gguf file) reads as another model: `any_model` (--any-model) skips that check.
    """
    problems = []
    if int(cache.d_model) != sae_cfg.d_model:
        problems.append(f"d_model {cache.d_model} vs {sae_cfg.d_model}")
    if sae_cfg.model and str(cache.model) != sae_cfg.model and not any_model:
        problems.append(f"model {cache.model!r} vs {sae_cfg.model!r}")
    if sae_cfg.layer >= 0 and cache.layer != sae_cfg.layer:  # None: the cache does not say
        problems.append(f"layer {cache.layer} vs {sae_cfg.layer}")
    if problems:
        raise SaeError(
            f"cache {cache.url} does not hold the SAE's inputs ({'; '.join(problems)}: cache vs "
            f"SAE in {run}); evaluate on a cache harvested from model {sae_cfg.model or '?'} at "
            f"layer {sae_cfg.layer} (d_model {sae_cfg.d_model})"
            + (
                ", or pass --any-model if the cache's model is the same one under another name"
                if any(p.startswith("model ") for p in problems)
                else ""
            )
        )


def heldout_batches(cache, batch: int, tokens: int | None, device) -> tuple[Iterator, int]:
    """(iterator over held-out (≤batch, D) float32 batches, rows it will yield)."""
    start, stop = cache.heldout_rows
    available = int(stop) - int(start)
    if available <= 0:
        raise SaeError(
            f"cache {cache.url} has no held-out rows; harvest more tokens (the held-out split "
            "is a fixed slice of the cache)"
        )
    n = available if tokens is None else min(int(tokens), available)

    def rows() -> Iterator[torch.Tensor]:
        stream = cache.batches(
            batch,
            split="heldout",
            shuffle=False,
            epochs=1,
            drop_last=False,
            device=device,
            dtype=torch.float32,
        )
        left = n
        try:
            for x in stream:
                if left <= 0:
                    break
                x = x[:left]
                left -= x.shape[0]
                yield x
        finally:
            stream.close()

    return rows(), n


def evaluate_on_cache(
    sae, cache_url: str, plan: EvalPlan, *, run: str, tokens, batch, device, any_model=False
):
    """Open the cache, check it, and evaluate every setting of `plan` on its held-out rows."""
    from sae.progress import make_progress
    from sae.store import open_cache

    if "://" not in cache_url and not Path(cache_url).exists():
        raise SaeError(f"no cache at {cache_url}; pass the --out directory of `sae harvest`")
    cache = open_cache(cache_url)
    check_cache_matches(sae.cfg, cache, run, any_model=any_model)
    batches, n = heldout_batches(cache, batch, tokens, device)
    with make_progress("tok") as progress:
        task = progress.add_task("eval held-out", total=n)

        def counted() -> Iterator[torch.Tensor]:
            for x in batches:
                yield x
                progress.advance(task, x.shape[0])

        result = evaluate_sae(sae, counted(), plan)
    start, stop = cache.heldout_rows
    if n == stop - start:  # all of the split: ~HELDOUT_FRACTION of the cache, less position 0
        context = cache.context or 0
        kept = 1 - 1 / context if context > 1 else 1.0
        result.tokens_for_100k = math.ceil(100_000 / kept / HELDOUT_FRACTION)
    return result


def eval_document(run: str, sae, cache_url: str | None, result: EvalResult | None) -> dict:
    """The eval.json object (see docs: one row per inference setting, plus the paper's extras)."""
    cfg = sae.cfg
    doc: dict = {
        "run": str(run),
        "label": Path(run).resolve().name,
        "sae": {
            "arch": cfg.arch,
            "k": cfg.k,
            "n_latents": cfg.n_latents,
            "d_model": cfg.d_model,
            "input_scale": cfg.input_scale,
            "model": cfg.model,
            "layer": cfg.layer,
            "hook": cfg.hook,
        },
        "definitions": {
            "fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated held-out rows",
            "ev": "1 - fvu",
            "mse": "sum ||x - x_hat||^2 / (rows * d_model), model space",
            "l0": "mean latents > 0 per row",
            "dead": "latents that never fired on the evaluated rows",
            "almost_dead": "latents with firing frequency < 1e-5 (dead included)",
            "rank_cosine": "[i-1] = mean cos(W_dec[e_i], W_dec[e_i+1]) over rows, e_i = i-th "
            "largest active latent",
        },
    }
    if result is not None:
        doc |= {
            "cache": cache_url,
            "tokens": result.n_rows,
            "results": result.rows,
            "skipped": result.skipped,
            "top1_ev": result.top_ev(1),
            "top2_ev": result.top_ev(2),
            "rank_cosine": result.rank_cosine,
            "histogram_setting": result.histogram_setting,
            "histograms": result.histograms,
        }
        if result.n_rows < 100_000:
            more = (
                "this is all of the cache's held-out split (~1% of it, position 0 left out): "
                f"a cache of {result.tokens_for_100k:,} tokens or more has enough"
                if result.tokens_for_100k
                else "pass --tokens 1M or more"
            )
            doc["notes"] = [
                f"only {result.n_rows} rows evaluated: almost-dead (< 1e-5) needs >= 100000 "
                f"rows to differ from dead; {more}"
            ]
    else:
        doc["results"] = []
    return doc


CACHE_KEYS = (
    "cache",
    "tokens",
    "results",
    "skipped",
    "top1_ev",
    "top2_ev",
    "rank_cosine",
    "histogram_setting",
    "histograms",
    "notes",
)
DOWNSTREAM_KEYS = ("downstream", "downstream_model", "downstream_text")


def merge_previous(doc: dict, path: str | Path) -> dict:
    """Keep the parts of an earlier eval.json of the same SAE that this call did not redo.

    So `sae eval RUN --cache C` and `sae eval RUN --model M --text T` can run separately and
    both end up in RUN/eval.json.
    """
    path = Path(path)
    if not path.is_file():
        return doc
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return doc
    if not isinstance(old, dict) or old.get("sae") != doc["sae"]:
        return doc
    merged = dict(doc)
    if not doc.get("results") and old.get("results"):
        merged |= {key: old[key] for key in CACHE_KEYS if key in old}
    if "downstream" not in doc and old.get("downstream"):
        merged |= {key: old[key] for key in DOWNSTREAM_KEYS if key in old}
    return merged


def write_json(doc: dict, path: str | Path) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def read_eval(path: str | Path) -> dict:
    """An eval.json (or a run directory holding one), validated enough to plot."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_FILE
        if not path.is_file():
            raise SaeError(
                f"{path.parent} has no {EVAL_FILE}; run `sae eval {path.parent} --cache CACHE` first"
            )
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SaeError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaeError(f"cannot read {path}: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sae"), dict):
        raise SaeError(f"{path} is not an eval.json written by `sae eval`")
    if not isinstance(doc.get("results"), list):
        raise SaeError(f"{path} has no results list; rerun `sae eval`")
    problem = _unplottable(doc)
    if problem:
        raise SaeError(f"{path}: {problem}; it was not written by `sae eval` (rerun it)")
    return doc


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unplottable(doc: dict) -> str | None:
    """What in an eval.json the report and plots could not read (it may come from elsewhere)."""
    sae = doc["sae"]
    if not isinstance(sae.get("arch"), str) or not (
        sae["arch"] == "jumprelu" or _number(sae.get("k"))
    ):
        return "sae.arch or sae.k is missing"
    for i, row in enumerate(doc["results"]):
        fields = ("l0", "fvu", "ev", "mse", "dead", "almost_dead")
        if not isinstance(row, dict) or row.get("mode") not in ("topk", "threshold"):
            return f"results[{i}] is not a result row"
        if not all(_number(row.get(key)) for key in fields) or not (
            row["mode"] == "threshold" or _number(row.get("k"))
        ):
            return f"results[{i}] lacks one of mode, k, {', '.join(fields)}"
    for i, row in enumerate(doc.get("downstream") or []):
        if not isinstance(row, dict) or not all(
            _number(row.get(key)) for key in ("l0", "ce_increase")
        ):
            return f"downstream[{i}] lacks l0 or ce_increase"
    histograms = doc.get("histograms") or {}
    if not isinstance(histograms, dict):
        return "histograms is not an object"
    for key, hist in histograms.items():
        if not hist:
            continue
        edges = hist.get("edges") if isinstance(hist, dict) else None
        counts = hist.get("counts") if isinstance(hist, dict) else None
        if not (isinstance(edges, list) and isinstance(counts, list)):
            return f"histogram {key} lacks edges or counts"
        if len(edges) != len(counts) + 1 or not all(map(_number, [*edges, *counts])):
            return f"histogram {key} has {len(counts)} counts for {len(edges)} edges"
    cosine = doc.get("rank_cosine") or []
    if not isinstance(cosine, list) or not all(c is None or _number(c) for c in cosine):
        return "rank_cosine is not a list of numbers"
    return None


def print_report(doc: dict, console=None) -> None:
    """One rich table per measurement (held-out reconstruction; downstream when present)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    sae = doc["sae"]
    if doc.get("results"):
        table = Table(
            title=f"{doc['label']}: {sae['arch']} k={sae['k']} latents={sae['n_latents']} "
            f"on {doc.get('tokens', 0):,} held-out tokens"
        )
        for col in ("setting", "ℓ0", "FVU", "EV", "MSE", "dead", "almost dead"):
            table.add_column(col, justify="right")
        for row in doc["results"]:
            setting = Setting(row["mode"], row["k"]).label
            table.add_row(
                setting,
                f"{row['l0']:.2f}",
                f"{row['fvu']:.4f}",
                f"{row['ev']:.4f}",
                f"{row['mse']:.4g}",
                str(row["dead"]),
                str(row["almost_dead"]),
            )
        console.print(table)
        top = [
            f"top-{k} EV {doc.get(f'top{k}_ev'):.4f}"
            for k in (1, 2)
            if doc.get(f"top{k}_ev") is not None
        ]
        if top:
            console.print("Table 2: " + ", ".join(top))
    for line in [*doc.get("skipped", []), *doc.get("notes", [])]:
        console.print(f"note: {line}")
    if doc.get("downstream"):
        table = Table(
            title=f"downstream: SAE spliced into {doc.get('downstream_model', 'the model')}"
        )
        for col in ("setting", "ℓ0", "CE clean", "CE spliced", "CE increase", "KL", "CE recovered"):
            table.add_column(col, justify="right")
        for row in doc["downstream"]:
            table.add_row(
                Setting(row["mode"], row["k"]).label,
                f"{row['l0']:.2f}",
                f"{row['ce_clean']:.4f}",
                f"{row['ce_spliced']:.4f}",
                f"{row['ce_increase']:.4f}",
                f"{row['kl']:.4f}",
                "-" if row.get("ce_recovered") is None else f"{row['ce_recovered']:.4f}",
            )
        console.print(table)
