"""`sae eval` and `sae plot`: the paper's measurements for a trained SAE, and its figures.

Heavy imports (torch, the store, transformers, matplotlib) happen inside the functions so that
`sae --help` stays fast.
"""

from __future__ import annotations

import typer


def parse_ks(text: str | None) -> list[int] | None:
    """'1,2,4' -> [1, 2, 4]; None stays None (the default sweep)."""
    from sae.errors import SaeError

    if text is None:
        return None
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SaeError(f"--k {text!r}: give comma-separated integers, e.g. 1,2,4,8") from None
    if not ks or min(ks) < 1:
        raise SaeError(f"--k {text!r}: every k must be >= 1")
    return ks


def eval_command(
    run: str = typer.Argument(
        ..., help="Run directory of `sae train` (or an exported `sae` folder)."
    ),
    cache: str = typer.Option(None, "--cache", help="Cache whose held-out split to evaluate on."),
    k: str = typer.Option(
        None, "--k", help="Inference k values, e.g. 1,2,4,8 (default 1..512 in powers of 2)."
    ),
    tokens: str = typer.Option("1M", "--tokens", help="Held-out tokens to use (at most all)."),
    out: str = typer.Option(None, "--out", help="JSON to write (default RUN/eval.json)."),
    batch: int = typer.Option(4096, "--batch", help="Rows per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    model: str = typer.Option(
        None, "--model", help="Downstream: the LM (hub id, folder or .gguf) to splice the SAE into."
    ),
    text: str = typer.Option(
        None, "--text", help="Downstream: held-out text (file, folder, python-docs or hub dataset)."
    ),
    gguf_file: str = typer.Option(None, "--gguf-file", help="GGUF file inside the --model folder."),
    context: int = typer.Option(
        None, "--context", help="Downstream window length (default: the SAE's)."
    ),
    text_tokens: str = typer.Option("64K", "--text-tokens", help="Downstream tokens to score."),
    text_batch: int = typer.Option(
        2, "--text-batch", help="Downstream windows per forward (logits are batch×context×vocab)."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="Downstream model dtype: auto, bf16, fp32."),
    any_model: bool = typer.Option(
        False,
        "--any-model",
        help="Accept a cache whose model name differs from the SAE's (e.g. a local copy of it); "
        "layer and d_model are still checked.",
    ),
) -> None:
    """Held-out FVU/EV/MSE/ℓ0/dead latents at each inference k, and downstream CE/KL."""
    from pathlib import Path

    from sae.errors import SaeError
    from sae.eval.evaluate import plan_settings
    from sae.eval.pipeline import (
        EVAL_FILE,
        eval_document,
        merge_previous,
        print_report,
        write_json,
    )
    from sae.train.model import load_sae
    from sae.units import parse_count

    if cache is None and model is None:
        raise SaeError(
            "nothing to measure: pass --cache CACHE (held-out reconstruction) and/or "
            "--model MODEL --text TEXT (downstream CE/KL)"
        )
    if (model is None) != (text is None):
        raise SaeError("downstream evaluation needs both --model and --text")
    if batch < 1 or text_batch < 1:
        raise SaeError("--batch and --text-batch must be >= 1")
    ks = parse_ks(k)
    path = Path(out) if out else Path(run) / EVAL_FILE
    if path.is_dir():  # found out now, not after the evaluation has run
        raise SaeError(f"--out {path} is a directory; give the JSON file to write")
    sae = load_sae(run)
    dev = _device(device)
    sae = sae.to(dev)
    plan = plan_settings(sae.cfg.arch, sae.cfg.n_latents, sae.cfg.k, ks)
    if not plan.settings:
        raise SaeError(f"no k in --k {k} fits the dictionary ({sae.cfg.n_latents} latents)")
    result = None
    if cache is not None:
        from sae.eval.pipeline import evaluate_on_cache

        result = evaluate_on_cache(
            sae,
            cache,
            plan,
            run=run,
            tokens=parse_count(tokens, name="--tokens"),
            batch=batch,
            device=dev,
            any_model=any_model,
        )
    doc = eval_document(run, sae, cache, result)
    if model is not None:
        doc |= _downstream(
            sae, plan, model, text, gguf_file, context, text_tokens, text_batch, device, dtype
        )
    doc = merge_previous(doc, path)
    try:
        write_json(doc, path)
    except OSError as err:
        raise SaeError(f"cannot write --out {path}: {err.strerror}") from None
    if result is not None:
        from sae.eval.frequency import frequency_path, write_frequencies

        # RUN/latent_frequency.safetensors beside RUN/eval.json (`sae export` turns it into
        # SAELens' sparsity file); beside another --out it is named after that file, so two
        # runs evaluated into one folder keep theirs apart.
        default = path == Path(run) / EVAL_FILE
        write_frequencies(result.frequencies, frequency_path(path, default), tokens=result.n_rows)
    print_report(doc)
    typer.echo(f"wrote {path}")


def _device(device: str):
    from sae.runtime import resolve_device

    return resolve_device(device)


def _downstream(sae, plan, model, text, gguf_file, context, text_tokens, text_batch, device, dtype):
    from sae.errors import SaeError
    from sae.eval.lm import load_lm, model_source, text_windows
    from sae.eval.splice import splice_eval
    from sae.units import parse_count

    cfg = sae.cfg
    if cfg.layer < 0:
        raise SaeError("the SAE does not record its layer, so it cannot be spliced into a model")
    source = model_source(model, gguf_file)
    lm = load_lm(source, cfg.layer, cfg.d_model, device=device, dtype=dtype)
    sae.to(lm.device)
    window = context or cfg.context or 128
    windows = text_windows(
        text,
        lm.tokenizer,
        window,
        parse_count(text_tokens, name="--text-tokens"),
        text_batch,
        lm.device,
    )
    rows = splice_eval(
        lm.model,
        lm.block,
        sae,
        windows,
        plan.settings,
    )
    if not rows or rows[0]["predictions"] == 0:
        raise SaeError(f"--text {text} gave no full window of {window} tokens; give more text")
    return {"downstream": rows, "downstream_model": model, "downstream_text": text}


def plot_command(
    runs: list[str] = typer.Argument(
        ..., help="Run directories (with eval.json) or eval JSON files."
    ),
    out: str = typer.Option("sae-eval.png", "--out", help="PNG to write."),
) -> None:
    """FVU vs ℓ0 (training k marked), dead latents vs k, and latent histograms on one PNG."""
    from sae.eval.pipeline import read_eval
    from sae.eval.plot import plot_runs

    evals = [read_eval(run) for run in runs]
    path = plot_runs(evals, out)
    typer.echo(f"wrote {path}")
