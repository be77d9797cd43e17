"""Running statistics of stored activations, kept in float64 so 1e9-token sums stay exact enough.

Also the float16 guard: values that would become inf in float16 are clamped and counted, and
non-finite values are zeroed and counted, so a cache never holds inf or nan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sae.errors import SaeError
from sae.store.layout import FP16_MAX


@dataclass
class RunningStats:
    """Sums over every committed row; `merge` combines writers, `summary` gives the means."""

    d_model: int
    count: int = 0
    sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_sq_norm: float = 0.0
    max_abs: float = 0.0
    nonfinite: int = 0
    overflow: int = 0

    def __post_init__(self) -> None:
        if self.sum is None:
            self.sum = np.zeros(self.d_model, np.float64)

    def merge(self, other: RunningStats) -> None:
        self.count += other.count
        self.sum += other.sum
        self.sum_sq_norm += other.sum_sq_norm
        self.max_abs = max(self.max_abs, other.max_abs)
        self.nonfinite += other.nonfinite
        self.overflow += other.overflow

    def summary(self) -> dict:
        """The reader-facing form promised by the store API (means, not sums)."""
        n = max(self.count, 1)
        return {
            "count": self.count,
            "mean": self.sum / n,
            "mean_sq_norm": self.sum_sq_norm / n,
            "max_abs": self.max_abs,
            "nonfinite": self.nonfinite,
            "overflow": self.overflow,
        }

    def to_json(self) -> dict:
        return {
            "count": self.count,
            "sum": [float(v) for v in self.sum],
            "sum_sq_norm": self.sum_sq_norm,
            "max_abs": self.max_abs,
            "nonfinite": self.nonfinite,
            "overflow": self.overflow,
        }

    @classmethod
    def from_json(cls, data: object, d_model: int) -> RunningStats:
        """Parse stats from a commit record, which is untrusted input."""
        if not isinstance(data, dict):
            raise SaeError("cache statistics are not a JSON object; the commit record is damaged")
        try:
            total = np.asarray(data["sum"], dtype=np.float64)
            out = cls(
                d_model,
                count=_int(data["count"]),
                sum=total,
                sum_sq_norm=float(data["sum_sq_norm"]),
                max_abs=float(data["max_abs"]),
                nonfinite=_int(data["nonfinite"]),
                overflow=_int(data["overflow"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise SaeError(f"cache statistics are damaged ({err}); re-run the harvest") from None
        if total.shape != (d_model,):
            raise SaeError(f"cache statistics have {total.shape} sums, expected ({d_model},)")
        return out


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def sanitize_block(acts: Any, out: np.ndarray, stats: RunningStats) -> None:
    """Write `acts` (n, d) as float16 into `out`, updating `stats`; inf/nan never reach the cache.

    max_abs is over the finite input (so a huge outlier is visible even though it was clamped);
    the sums are over the clamped values. Casting and min/max run in torch (vectorised, several
    threads), the float64 sums in numpy, so the harvest thread spends little time here.
    """
    import torch

    x = torch.as_tensor(acts)
    if x.dtype != torch.float32:
        x = x.float()
    if x.numel() == 0:
        return
    mn, mx = (float(v) for v in torch.aminmax(x))
    n_bad = 0
    if not (math.isfinite(mn) and math.isfinite(mx)):
        finite = torch.isfinite(x)
        n_bad = int(x.numel() - int(finite.sum()))
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype))
        mn, mx = (float(v) for v in torch.aminmax(x))
    max_abs = max(-mn, mx)
    n_over = 0
    if max_abs > FP16_MAX:
        n_over = int((x.abs() > FP16_MAX).sum())
        x = x.clamp(-FP16_MAX, FP16_MAX)
    torch.from_numpy(out).copy_(x)
    xn = x.numpy()
    stats.count += xn.shape[0]
    stats.sum += xn.sum(axis=0, dtype=np.float64)
    stats.sum_sq_norm += float(np.einsum("ij,ij->i", xn, xn).sum(dtype=np.float64))
    stats.max_abs = max(stats.max_abs, max_abs)
    stats.nonfinite += n_bad
    stats.overflow += n_over
