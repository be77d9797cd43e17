"""The paper's figures for one or more evaluated runs, on one PNG (matplotlib, Agg backend).

Panels: (a) FVU vs ℓ0 (Figure 3: red dots at the ℓ0 each TopK/BatchTopK baseline was trained
at), (b) almost-dead and dead latents vs inference k (Figure 5), (c) decoder cosine similarity of
consecutive ranks (Figure 8), (d, e) per-latent firing frequency and mean squared activation
histograms (Figure 9), (f) downstream CE increase vs ℓ0 when measured, else top-1/top-2 EV
(Table 2). Input: the dicts `sae eval` writes to eval.json.
"""

from __future__ import annotations

from pathlib import Path

FIGSIZE = (15.0, 9.0)  # inches
DPI = 100  # -> 1500 x 900 pixels
BASELINES = ("topk", "batchtopk")  # archs whose training k is marked (the paper's red dots)


def run_label(ev: dict) -> str:
    """Legend name: the run folder and what it is, e.g. 'h128 (hierarchical, K=128)'."""
    sae = ev["sae"]
    k = (
        ""
        if sae["arch"] == "jumprelu"
        else f", {'K' if sae['arch'] == 'hierarchical' else 'k'}={sae['k']}"
    )
    return f"{ev.get('label', '?')} ({sae['arch']}{k})"


def _topk_rows(ev: dict) -> list[dict]:
    return [r for r in ev["results"] if r["mode"] == "topk"]


def _threshold_row(ev: dict) -> dict | None:
    return next((r for r in ev["results"] if r["mode"] == "threshold"), None)


def _pareto(ax, evals: list[dict], colors) -> None:
    marked = False
    for ev, color in zip(evals, colors, strict=False):
        rows = _topk_rows(ev)
        if rows:
            ax.plot(
                [r["l0"] for r in rows],
                [r["fvu"] for r in rows],
                "o-",
                color=color,
                ms=4,
                label=run_label(ev) + " top-k",
            )
        thr = _threshold_row(ev)
        if thr is not None:
            ax.plot(
                [thr["l0"]],
                [thr["fvu"]],
                "*",
                color=color,
                ms=13,
                mec="black",
                mew=0.6,
                label=run_label(ev) + " threshold",
            )
        if ev["sae"]["arch"] in BASELINES:
            trained = [r for r in rows if r["k"] == ev["sae"]["k"]]
            for r in trained:
                ax.plot(
                    [r["l0"]],
                    [r["fvu"]],
                    "o",
                    color="red",
                    ms=9,
                    zorder=5,
                    label=None if marked else "trained ℓ0 (baselines)",
                )
                marked = True
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ℓ0 (mean active latents per token)")
    ax.set_ylabel("FVU (lower is better)")
    ax.set_title("(a) FVU vs ℓ0 at inference")


def _dead(ax, evals: list[dict], colors) -> None:
    for ev, color in zip(evals, colors, strict=False):
        rows = _topk_rows(ev)
        if not rows:
            continue
        ks = [r["k"] for r in rows]
        ax.plot(ks, [r["almost_dead"] for r in rows], "o-", color=color, ms=4, label=run_label(ev))
        ax.plot(ks, [r["dead"] for r in rows], "x--", color=color, ms=5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("inference k")
    ax.set_ylabel("latents")
    ax.set_title("(b) almost-dead (solid: freq < 1e-5) and dead (dashed)")


def _cosine(ax, evals: list[dict], colors) -> None:
    for ev, color in zip(evals, colors, strict=False):
        cos = ev.get("rank_cosine") or []
        points = [(i + 1, c) for i, c in enumerate(cos) if c is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "-", color=color, label=run_label(ev))
    ax.set_xlabel("rank i")
    ax.set_ylabel("mean cos(e_i, e_i+1)")
    ax.set_title("(c) decoder similarity of consecutive ranks")


def _histogram(ax, evals: list[dict], colors, key: str, title: str, xlabel: str) -> None:
    used: list[float] = []
    for ev, color in zip(evals, colors, strict=False):
        hist = (ev.get("histograms") or {}).get(key)
        if not hist:
            continue
        edges, counts = hist["edges"], hist["counts"]
        ax.stairs(
            counts,
            edges,
            color=color,
            lw=1.5,
            label=f"{run_label(ev)} [{ev.get('histogram_setting')}]",
        )
        filled = [i for i, c in enumerate(counts) if c]
        if filled:
            used += [edges[max(filled[0] - 1, 0)], edges[min(filled[-1] + 2, len(edges) - 1)]]
    if used:
        ax.set_xlim(min(used), max(used))  # zoom on the occupied bins
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latents")
    ax.set_title(title)


def _downstream_or_top(ax, evals: list[dict], colors) -> None:
    if any(ev.get("downstream") for ev in evals):
        for ev, color in zip(evals, colors, strict=False):
            rows = ev.get("downstream") or []
            if rows:
                ax.plot(
                    [r["l0"] for r in rows],
                    [r["ce_increase"] for r in rows],
                    "o-",
                    color=color,
                    ms=4,
                    label=run_label(ev),
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ℓ0")
        ax.set_ylabel("CE increase (nats/token)")
        ax.set_title("(f) downstream: CE increase with the SAE spliced in")
        return
    width = 0.8 / max(len(evals), 1)
    for i, (ev, color) in enumerate(zip(evals, colors, strict=False)):
        values = [ev.get("top1_ev"), ev.get("top2_ev")]
        xs = [j + i * width for j in range(2)]
        ax.bar(
            xs,
            [v if v is not None else 0.0 for v in values],
            width,
            color=color,
            label=run_label(ev),
        )
    ax.set_xticks([0.4 - width / 2, 1.4 - width / 2], ["top-1", "top-2"])
    ax.set_ylabel("explained variance")
    ax.set_title("(f) EV of the top-1 / top-2 latents")


def plot_runs(evals: list[dict], out: str | Path) -> Path:
    """Write the six-panel figure for `evals` (eval.json dicts) to `out` (PNG, 1500×900 px)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(evals))]
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    try:
        (a, b, c), (d, e, f) = axes
        _pareto(a, evals, colors)
        _dead(b, evals, colors)
        _cosine(c, evals, colors)
        _histogram(
            d,
            evals,
            colors,
            "log10_frequency",
            "(d) latent firing frequency",
            "log10 firing frequency",
        )
        _histogram(
            e,
            evals,
            colors,
            "log10_mean_sq_activation",
            "(e) latent mean squared activation (when on)",
            "log10 mean squared activation",
        )
        _downstream_or_top(f, evals, colors)
        for ax in axes.flat:
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
        tokens = sorted({ev.get("tokens") for ev in evals if ev.get("tokens")})
        where = f" — {', '.join(f'{t:,}' for t in tokens)} held-out tokens" if tokens else ""
        fig.suptitle(f"SAE evaluation{where}", fontsize=14)
        fig.tight_layout(rect=(0, 0, 1, 0.96))
        path = Path(out)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return path
