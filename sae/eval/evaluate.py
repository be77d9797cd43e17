"""Evaluate one SAE at many inference settings in one pass over held-out activations.

Top-k settings share one encode: the top-k_max latents sorted descending contain every smaller
top-k as a prefix, so the reconstructions for k = 1, 2, 4, ... are built incrementally from the
same (vals, idx). Threshold inference (BatchTopK's θ, JumpReLU's per-latent θ) is one more
setting. Everything is compared in model space (the SAE's input scale undone).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from sae.eval.metrics import (
    RankCosineAccumulator,
    ReconAccumulator,
    VarianceAccumulator,
    latent_histograms,
)

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GATHER_ELEMENTS = 1 << 25  # cap on the (rows, k, D) decoder gather of one decode call


@dataclass
class Setting:
    """One inference setting: per-row top-k at `k`, or the SAE's threshold (k is None)."""

    mode: str  # "topk" | "threshold" ("zero": the ablation baseline of downstream evals)
    k: int | None = None

    @property
    def label(self) -> str:
        return f"top-{self.k}" if self.mode == "topk" else "threshold"


@dataclass
class EvalPlan:
    """Which settings to measure for an SAE, and which requested k were skipped (and why)."""

    settings: list[Setting]
    skipped: list[str] = field(default_factory=list)
    natural: Setting | None = None  # the setting whose latent histograms are reported


def plan_settings(arch: str, n_latents: int, train_k: int, ks: list[int] | None) -> EvalPlan:
    """Top-k at each k (k > dictionary skipped with a note), plus threshold where it exists.

    BatchTopK: both top-k and threshold. JumpReLU: its natural threshold ℓ0, and top-k only
    when ks were asked for explicitly. Top-k SAEs' histograms use their training k.
    """
    explicit = ks is not None
    wanted = sorted(set(ks if explicit else DEFAULT_KS))
    if arch in ("hierarchical", "topk", "batchtopk") and train_k not in wanted and not explicit:
        wanted = sorted({*wanted, train_k})
    settings: list[Setting] = []
    skipped: list[str] = []
    if arch != "jumprelu" or explicit:
        for k in wanted:
            if k > n_latents:
                skipped.append(f"k={k} skipped: larger than the dictionary ({n_latents} latents)")
            else:
                settings.append(Setting("topk", k))
    threshold = Setting("threshold") if arch in ("batchtopk", "jumprelu") else None
    if threshold is not None:
        settings.append(threshold)
    natural = threshold
    if natural is None:
        natural = next((s for s in settings if s.k == train_k), None)
    return EvalPlan(settings, skipped, natural)


@dataclass
class EvalResult:
    """Per-setting metrics plus the paper's Table 2 / Figure 8 / Figure 9 extras."""

    n_rows: int
    rows: list[dict]  # {"mode", "k", "fvu", "ev", "mse", "l0", "dead", "almost_dead"}
    skipped: list[str]
    rank_cosine: list[float | None]
    histograms: dict | None
    histogram_setting: str | None
    frequencies: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> (F,) firing
    # every held-out row of the cache was evaluated: the cache size that would give 100K rows
    tokens_for_100k: int | None = None

    def top_ev(self, k: int) -> float | None:
        """EV with only the top-k latents per row (Table 2: k = 1, 2)."""
        for row in self.rows:
            if row["mode"] == "topk" and row["k"] == k:
                return row["ev"]
        return None


def add_latents(
    recon: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor
) -> None:
    """recon += Σ_i vals[:, i] W_dec[idx[:, i]], in row chunks so the gather stays small."""
    if vals.shape[1] == 0:
        return
    rows = max(1, GATHER_ELEMENTS // (vals.shape[1] * W_dec.shape[1]))
    for start in range(0, vals.shape[0], rows):
        v, i = vals[start : start + rows], idx[start : start + rows]
        recon[start : start + rows] += (v.unsqueeze(-1).to(W_dec.dtype) * W_dec[i]).sum(1)


@torch.no_grad()
def evaluate_sae(sae, batches: Iterable[torch.Tensor], plan: EvalPlan) -> EvalResult:
    """Run every setting of `plan` over `batches` of model-space (B, D) activations."""
    cfg = sae.cfg
    device = sae.W_dec.device
    topk = [s for s in plan.settings if s.mode == "topk"]
    ks = [s.k for s in topk]
    k_max = max(ks) if ks else 0
    variance = VarianceAccumulator(cfg.d_model)
    accs = {s.label: ReconAccumulator(cfg.d_model, cfg.n_latents, variance) for s in plan.settings}
    # Figure 8 looks at the ranks the SAE was trained on (its k), within what is encoded here.
    cosine = RankCosineAccumulator(min(cfg.k, k_max) if cfg.k >= 1 else k_max)
    scale = cfg.input_scale
    for batch in batches:
        x = batch.to(device=device, dtype=torch.float32)
        variance.update(x)
        if topk:
            vals, idx = sae.encode(x, k_max, mode="topk")
            cosine.update(vals, idx, sae.W_dec)
            recon = sae.b_dec.detach().float().expand(x.shape[0], -1).clone()  # SAE space
            done = 0
            for k in ks:
                add_latents(recon, vals[:, done:k], idx[:, done:k], sae.W_dec.detach())
                done = k
                accs[f"top-{k}"].update_sparse(x, recon / scale, vals[:, :k], idx[:, :k])
        if any(s.mode == "threshold" for s in plan.settings):
            latents = sae.encode_dense(x, mode="threshold")
            recon = sae.decode_dense(latents) / scale
            accs["threshold"].update_dense(x, recon, latents)
    rows, hist, freqs = [], None, {}
    n_rows = 0
    for setting in plan.settings:
        metrics = accs[setting.label].result()
        n_rows = metrics.n_rows
        rows.append({"mode": setting.mode, "k": setting.k, **metrics.summary()})
        freqs[setting.label] = metrics.frequency.float()
        if plan.natural is not None and setting.label == plan.natural.label:
            hist = latent_histograms(metrics)
    return EvalResult(
        n_rows=n_rows,
        rows=rows,
        skipped=plan.skipped,
        rank_cosine=cosine.result(),
        histograms=hist,
        histogram_setting=plan.natural.label if plan.natural else None,
        frequencies=freqs,
    )
