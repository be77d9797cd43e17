"""PyTorch reference of the sparse SAE ops: the ground truth the Triton kernels are tested against.

Every function computes in the dtype of its inputs (promoted), so calling it on float64 copies
gives a float64 reference whose autograd gradients are the reference gradients too. It also
serves as the CPU path of the dispatcher.
"""

from __future__ import annotations

import torch


def loss_indices(k: int, every: int = 1) -> list[int]:
    """The 1-based prefix lengths J_m = {1} ∪ {j ≤ k : j mod m = 0} of the paper's §3.4 (m=1: all)."""
    if every < 1 or k < 1:
        raise ValueError(f"need k >= 1 and every >= 1, got k={k}, every={every}")
    return sorted({1} | {j for j in range(every, k + 1, every)})


def topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(top-k of x @ W_enc.T + b_enc) per row: (vals sorted descending, idx)."""
    pre = torch.addmm(b_enc.to(x.dtype), x, W_enc.to(x.dtype).T)  # bf16 under autocast
    vals, idx = pre.topk(k, dim=-1, sorted=True)
    return vals.relu(), idx


def topk_decode(
    vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    """x̂ = b_dec + Σ_i vals[:, i] · W_dec[idx[:, i]] (materialises (B, K, D): reference only)."""
    emb = W_dec[idx]
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


def listing1_loss(
    vals: torch.Tensor,
    idx: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """The paper's Listing 1 (naive baseline for benchmarks), scaled to our loss (sum over D).

    Listing 1 takes `.mean()` over (B, K, D); ours sums over D, hence the factor D.
    """
    B, K = idx.shape
    emb = W_dec[idx.view(-1)].view(B, K, -1) * vals.unsqueeze(-1).to(W_dec.dtype)
    recon_cum = emb.cumsum(dim=1) + b_dec  # Listing 1 has b_dec.unsqueeze(1): a typo
    diff = recon_cum - x.unsqueeze(1).to(recon_cum.dtype)
    return diff.pow(2).mean() * x.shape[1]
