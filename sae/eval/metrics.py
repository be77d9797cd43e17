"""Reconstruction and sparsity metrics on plain tensors, accumulated in float64 over batches.

Definitions (all over the evaluated held-out rows, in model space; FVU is scale-invariant):
- FVU = Σ_rows ||x − x̂||² / Σ_rows ||x − x̄||², with x̄ the mean row of the evaluated set (the
  paper's Var(x − x̂)/Var(x) with the total variance summed over dimensions). The denominator is
  accumulated with Chan's parallel update of per-dimension means, so it is exact for streamed
  batches and does not cancel catastrophically when the mean is large.
- explained variance EV = 1 − FVU; MSE = Σ||x − x̂||² / (rows · d_model) (per element).
- ℓ0 = mean number of latents with activation > 0 per row.
- a latent's firing frequency = rows where it is > 0 / rows. Dead: never fired; almost dead:
  frequency < 1e-5 (the paper's Figure 5; this count includes the dead ones). With fewer than
  1e5 rows the two counts are necessarily equal.
- a latent's mean squared activation = Σ a² / (rows where it fired): the typical size of the
  latent when it is on (the paper's Figure 9b), NaN for dead latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALMOST_DEAD_FREQUENCY = 1e-5


@dataclass
class ReconMetrics:
    """The numbers one inference setting gets on the evaluated rows."""

    n_rows: int
    fvu: float
    ev: float
    mse: float
    l0: float
    dead: int
    almost_dead: int
    frequency: torch.Tensor  # (F,) float64 firing frequency
    mean_sq_activation: torch.Tensor  # (F,) float64, NaN where never fired

    def summary(self) -> dict:
        """The scalar part, JSON-ready."""
        return {
            "fvu": self.fvu,
            "ev": self.ev,
            "mse": self.mse,
            "l0": self.l0,
            "dead": self.dead,
            "almost_dead": self.almost_dead,
        }


class VarianceAccumulator:
    """Σ_rows ||x − x̄||² of a stream of batches (Chan et al.'s pairwise merge, float64).

    Sums stay on the batches' device (no host copy per batch).
    """

    def __init__(self, d_model: int) -> None:
        self.n = 0
        self.d_model = d_model
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | float = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        if self.mean is None:
            self.mean = torch.zeros(self.d_model, dtype=torch.float64, device=x.device)
        mean_b = x.mean(0)
        m2_b = (x - mean_b).pow(2).sum()
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + delta.pow(2).sum() * (self.n * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n

    @property
    def total(self) -> float:
        """Σ_rows ||x − x̄||² so far."""
        return float(self.m2)


class ReconAccumulator:
    """Streams (x, x̂, latents) batches of one inference setting into ReconMetrics.

    Settings evaluated on the same rows can share one `variance` (then the caller updates it).
    """

    def __init__(
        self, d_model: int, n_latents: int, variance: VarianceAccumulator | None = None
    ) -> None:
        self.d_model, self.n_latents = d_model, n_latents
        self.owns_variance = variance is None
        self.variance = variance if variance is not None else VarianceAccumulator(d_model)
        self.sq_err: torch.Tensor | float = 0.0
        self.active: torch.Tensor | int = 0
        self.fire_counts: torch.Tensor | None = None
        self.sq_act: torch.Tensor | None = None

    def _update_recon(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        if self.owns_variance:
            self.variance.update(x)
        diff = x.detach().double() - x_hat.detach().double()
        self.sq_err = self.sq_err + diff.pow(2).sum()
        if self.fire_counts is None:
            self.fire_counts = torch.zeros(self.n_latents, dtype=torch.int64, device=x.device)
            self.sq_act = torch.zeros(self.n_latents, dtype=torch.float64, device=x.device)

    def update_sparse(
        self, x: torch.Tensor, x_hat: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor
    ) -> None:
        """x, x̂: (B, D); vals, idx: (B, k) latents (zero values are not active)."""
        self._update_recon(x, x_hat)
        on = vals.detach() > 0
        self.active = self.active + on.sum()
        flat_idx = idx.detach().reshape(-1).to(self.fire_counts.device)
        self.fire_counts.index_add_(0, flat_idx, on.reshape(-1).to(torch.int64))
        self.sq_act.index_add_(0, flat_idx, (vals.detach().pow(2) * on).reshape(-1).double())

    def update_dense(self, x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor) -> None:
        """x, x̂: (B, D); latents: (B, F) activations (> 0 means active)."""
        self._update_recon(x, x_hat)
        on = latents.detach() > 0
        self.active = self.active + on.sum()
        self.fire_counts += on.sum(0, dtype=torch.int64)
        self.sq_act += (latents.detach().pow(2) * on).sum(0, dtype=torch.float64)

    def result(self) -> ReconMetrics:
        n = self.variance.n
        if n == 0 or self.fire_counts is None:
            raise ValueError("no rows were evaluated")
        sq_err = float(self.sq_err)
        fvu = fvu_from_sums(sq_err, self.variance.total)
        counts = self.fire_counts.cpu()
        frequency = counts.double() / n
        sq_act = self.sq_act.cpu()
        mean_sq = torch.where(counts > 0, sq_act / counts.clamp_min(1), math.nan)
        dead, almost_dead = dead_counts(frequency)
        return ReconMetrics(
            n_rows=n,
            fvu=fvu,
            ev=1.0 - fvu,
            mse=sq_err / (n * self.d_model),
            l0=int(self.active) / n,
            dead=dead,
            almost_dead=almost_dead,
            frequency=frequency,
            mean_sq_activation=mean_sq,
        )


def fvu_from_sums(sq_err: float, total_var: float) -> float:
    """Σ||x − x̂||² / Σ||x − x̄||²; NaN when the rows have no variance at all."""
    return sq_err / total_var if total_var > 0 else math.nan


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVU of one (N, D) batch (float64), as defined in the module docstring."""
    x64 = x.detach().double()
    err = float((x64 - x_hat.detach().double()).pow(2).sum())
    return fvu_from_sums(err, float((x64 - x64.mean(0)).pow(2).sum()))


def dead_counts(
    frequency: torch.Tensor, almost_dead_below: float = ALMOST_DEAD_FREQUENCY
) -> tuple[int, int]:
    """(never fired, fired with frequency < almost_dead_below) from per-latent frequencies."""
    return int((frequency == 0).sum()), int((frequency < almost_dead_below).sum())


class RankCosineAccumulator:
    """Mean cos(W_dec[e_i], W_dec[e_{i+1}]) by rank i, over rows where both ranks are active.

    e_i is the latent with the i-th largest activation in a row (the paper's Figure 8).
    """

    def __init__(self, k: int, max_elements: int = 1 << 24) -> None:
        self.sums = torch.zeros(max(k - 1, 0), dtype=torch.float64)
        self.counts = torch.zeros(max(k - 1, 0), dtype=torch.int64)
        self.max_elements = max_elements
        self._unit: tuple[torch.Tensor, torch.Tensor] | None = None  # (W_dec, its unit rows)

    def _unit_rows(self, W_dec: torch.Tensor) -> torch.Tensor:
        """Unit-normalised decoder rows, computed once per decoder (it is large)."""
        if self._unit is None or self._unit[0] is not W_dec:
            unit = W_dec.detach().float()
            self._unit = (W_dec, unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return self._unit[1]

    def update(self, vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor) -> None:
        """vals, idx: (B, k) sorted descending; W_dec: (F, D) decoder rows."""
        k = vals.shape[1]
        if k < 2 or self.sums.numel() == 0:
            return
        k = min(k, self.sums.numel() + 1)
        unit = self._unit_rows(W_dec)
        rows = max(1, self.max_elements // (k * unit.shape[1]))
        for start in range(0, vals.shape[0], rows):
            v = vals[start : start + rows, :k].detach()
            emb = unit[idx[start : start + rows, :k]]  # (b, k, D)
            cos = (emb[:, :-1] * emb[:, 1:]).sum(-1).double()  # (b, k-1)
            both = (v[:, :-1] > 0) & (v[:, 1:] > 0)
            self.sums[: k - 1] += (cos * both).sum(0).cpu()
            self.counts[: k - 1] += both.sum(0).cpu()

    def result(self) -> list[float | None]:
        """Mean cosine for ranks 1..k−1 (None where no row had both ranks active)."""
        means = self.sums / self.counts.clamp_min(1)
        return [float(m) if c > 0 else None for m, c in zip(means, self.counts, strict=True)]


FREQUENCY_EDGES = [x / 4 for x in range(-32, 1)]  # log10 frequency, 1e-8 .. 1
MEAN_SQ_EDGES = [x / 4 for x in range(-24, 25)]  # log10 mean squared activation, 1e-6 .. 1e6


def log10_histogram(values: torch.Tensor, edges: list[float]) -> dict:
    """Counts of log10(values) in fixed bins (the same for every run, so runs can be overlaid).

    Values outside the range land in the first/last bin; zero and NaN values are left out and
    counted under "excluded" (dead latents).
    """
    v = values.double()
    ok = torch.isfinite(v) & (v > 0)
    logs = v[ok].log10().clamp(edges[0], edges[-1])
    counts = torch.histogram(logs, bins=torch.tensor(edges, dtype=torch.float64)).hist
    return {
        "edges": list(edges),
        "counts": [int(c) for c in counts.tolist()],
        "excluded": int((~ok).sum()),
    }


def latent_histograms(metrics: ReconMetrics) -> dict:
    """The paper's Figure 9: per-latent firing frequency and mean squared activation."""
    return {
        "log10_frequency": log10_histogram(metrics.frequency, FREQUENCY_EDGES),
        "log10_mean_sq_activation": log10_histogram(metrics.mean_sq_activation, MEAN_SQ_EDGES),
    }
