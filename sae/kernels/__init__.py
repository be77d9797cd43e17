"""Sparse SAE ops with one call for the trainer: Triton kernels on CUDA, PyTorch reference on CPU.

Shapes: x (B, D); W_enc (F, D); b_enc (F,); W_dec (F, D); b_dec (D,); vals (B, K) sorted
descending; idx (B, K) int64. All ops are differentiable.

(Interface fixed by the foundation commit; the kernels issue fills in the fast paths.)
"""

from __future__ import annotations

import torch

__all__ = ["hierarchical_loss", "loss_indices", "topk_decode", "topk_encode"]


def loss_indices(k: int, every: int = 1) -> list[int]:
    """The 1-based prefix lengths J_m = {1} ∪ {j ≤ k : j mod m = 0} of the paper's §3.4 (m=1: all)."""
    if every < 1 or k < 1:
        raise ValueError(f"need k >= 1 and every >= 1, got k={k}, every={every}")
    return sorted({1} | {j for j in range(every, k + 1, every)})


def topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(top-k of x @ W_enc.T + b_enc) per row: (vals sorted descending, idx)."""
    pre = x @ W_enc.to(x.dtype).T + b_enc.to(x.dtype)
    vals, idx = pre.topk(k, dim=-1, sorted=True)
    return vals.relu(), idx


def topk_decode(
    vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    """x̂ = b_dec + Σ_i vals[:, i] · W_dec[idx[:, i]]."""
    emb = W_dec[idx]  # (B, K, D)
    return b_dec + (vals.unsqueeze(-1).to(emb.dtype) * emb).sum(1)


def hierarchical_loss(
    vals: torch.Tensor,
    idx: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    x: torch.Tensor,
    every: int = 1,
) -> torch.Tensor:
    """mean over rows and j ∈ J of ||x − x̂_j||², x̂_j = b_dec + Σ_{i≤j} vals_i · W_dec[idx_i]."""
    js = torch.tensor(loss_indices(vals.shape[1], every), device=vals.device) - 1
    emb = W_dec[idx] * vals.unsqueeze(-1).to(W_dec.dtype)
    recon = emb.cumsum(1)[:, js] + b_dec
    return (recon - x.unsqueeze(1).to(recon.dtype)).pow(2).sum(-1).mean()
