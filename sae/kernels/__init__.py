"""Sparse SAE ops with one call for the trainer: Triton kernels on CUDA, PyTorch reference on CPU.

The encoder's top-k over the F pre-activation columns is an exact Triton selection
(sae/kernels/topk.py; 3.5x faster than torch.topk at F = 65,536, K = 128 on an H100, see
docs/benchmarks.md).

Shapes: x (B, D); W_enc (F, D); b_enc (F,); W_dec (F, D); b_dec (D,); vals (B, K) sorted
descending; idx (B, K) int64. All ops are differentiable.

Backend choice: `backend="triton"|"torch"` per call, else the SAE_KERNELS environment variable
(same values, or "auto"; empty is unset), else auto: Triton for CUDA tensors, the reference
otherwise. Forcing "triton" on CPU tensors works under TRITON_INTERPRET=1 (how the tests check
the kernels) and is refused without it. Shapes and devices are checked on both paths (metadata
only, no device sync). The Triton ops take K up to 1024 (triton_ops.MAX_K); topk_decode and
encode_selected, linear in the values, split larger K into runs.
W_enc's gradient and the TopK decoder's W_dec gradient are latent-sorted segment reductions
(no atomics, bitwise repeatable, faster than atomics on an H100). The hierarchical loss adds its
W_dec gradient with atomics; `deterministic=True` makes it a segment reduction too (bitwise
repeatable, about 2.3x slower at B=8192, K=128). Tuning knobs for benchmarks (read at call time):
SAE_KERNELS_WGRAD=atomic, SAE_KERNELS_TOPK=torch, SAE_KERNELS_STAGES=n (pipeline depth of the
row kernels' sweeps over K), SAE_KERNELS_UNROLL=n (steps per iteration of those sweeps), and the
tiles SAE_KERNELS_HIER_TILE / SAE_KERNELS_SWEEP_TILE / SAE_KERNELS_SEG_TILE /
SAE_KERNELS_TOPK_TILE="a,b,warps". `bench/sass_offline.py` compiles the row kernels for an H100
on a machine without a GPU and counts what their loops issue.
"""

from __future__ import annotations

import os

import torch

from sae.kernels import reference
from sae.kernels.reference import loss_indices

__all__ = [
    "encode_selected",
    "hierarchical_loss",
    "loss_indices",
    "topk_decode",
    "topk_encode",
    "uses_triton",
]

BACKENDS = ("auto", "triton", "torch")


def _interpreting() -> bool:
    """Whether TRITON_INTERPRET is on (Triton's reading of the variable)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def _use_triton(t: torch.Tensor, backend: str | None) -> bool:
    choice = backend or os.environ.get("SAE_KERNELS") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "auto":
        return t.is_cuda
    if choice == "triton" and not t.is_cuda and not _interpreting():
        # compiled Triton fails deep in its driver on non-CUDA tensors
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, got a {t.device.type} tensor: use a CUDA "
            'device, set TRITON_INTERPRET=1 (the interpreter, for tests), or backend="torch"'
        )
    return choice == "triton"


def uses_triton(t: torch.Tensor, backend: str | None = None) -> bool:
    """Whether calls on tensors like t take the Triton kernels (else the PyTorch reference)."""
    return _use_triton(t, backend)


def _check_shape(name: str, t: torch.Tensor, dims: str, *sizes: int | None) -> None:
    """t must be `dims` ("B,D") with these sizes (None: any), the ones the other arguments
    imply; the Triton kernels would read out of bounds, the reference broadcast or fail deep."""
    if t.dim() == len(sizes) and all(
        s is None or s == n for s, n in zip(sizes, t.shape, strict=True)
    ):
        return
    letters = dims.split(",")
    form = f"({', '.join(letters)}{',' if len(letters) == 1 else ''})"
    known = ", ".join(f"{c} = {s}" for c, s in zip(letters, sizes, strict=True) if s is not None)
    raise ValueError(
        f"{name} must be {form}{' with ' + known if known else ''}, got {tuple(t.shape)}"
    )


def _check_devices(**named: torch.Tensor | None) -> None:
    """All tensors on one device (a kernel would read another device's pointers as its own)."""
    (first, ref), *rest = ((n, t) for n, t in named.items() if t is not None)
    for name, t in rest:
        if t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but {first} on {ref.device}: all must be on one device"
            )


def _check_sparse(
    vals: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w_name: str = "W_dec"
) -> None:
    if vals.dim() != 2 or vals.shape != idx.shape:
        raise ValueError(
            f"vals and idx must both be (B, K), got {tuple(vals.shape)} and {tuple(idx.shape)}"
        )
    _check_shape(w_name, w, "F,D", None, None)


def _check_encoder(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_pre: torch.Tensor | None,
    rows: int | None = None,
) -> None:
    """x (B, D) (B = rows where given), W_enc (F, D), b_enc (F,), b_pre (D,), one device."""
    _check_shape("W_enc", W_enc, "F,D", None, None)
    f, d = W_enc.shape
    _check_shape("x", x, "B,D", rows, d)
    _check_shape("b_enc", b_enc, "F", f)
    if b_pre is not None:
        _check_shape("b_pre", b_pre, "D", d)
    _check_devices(x=x, W_enc=W_enc, b_enc=b_enc, b_pre=b_pre)


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    b_pre: torch.Tensor | None = None,
    backend: str | None = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(top-k of (x − b_pre) @ W_enc.T + b_enc) per row: (vals sorted descending, idx).

    The matmul and top-k run in PyTorch (cuBLAS); the backward never forms a dense (B, F)
    gradient: W_enc's and b_enc's gradients are scatter-adds of the (B, K) sparse gradient.
    Pass the centring bias as `b_pre` (rather than x − b_dec) when x needs no gradient: b_pre's
    gradient is then one GEMV instead of a (B, D) gather over W_enc (2 ms at B=8192, K=128).
    """
    _check_encoder(x, W_enc, b_enc, b_pre)
    if not _use_triton(x, backend):
        return reference.topk_encode(x if b_pre is None else x - b_pre, W_enc, b_enc, k)
    from sae.kernels.triton_ops import TopKEncode

    return TopKEncode.apply(x, W_enc, b_enc, b_pre, k, deterministic)


def encode_selected(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    vals: torch.Tensor,
    idx: torch.Tensor,
    *,
    b_pre: torch.Tensor | None = None,
    backend: str | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """`vals` (B, K), the relu'd encoder values at latents `idx` chosen without gradient (from
    `topk_encode` under no_grad, then cut further, as BatchTopK does), made differentiable in x,
    W_enc, b_enc and b_pre. The values are returned as given; the backward is topk_encode's
    sparse one (on the reference path, autograd through the recomputed values at idx). Call it
    under the same autocast as the selection: W_enc's gradient uses the matmul's input dtype.
    """
    _check_sparse(vals, idx, W_enc, "W_enc")
    _check_encoder(x, W_enc, b_enc, b_pre, vals.shape[0])
    _check_devices(x=x, vals=vals, idx=idx)
    if not _use_triton(x, backend):
        xc = x if b_pre is None else x - b_pre
        rows = W_enc[idx]  # (B, K, D): reference only
        dtype = torch.promote_types(xc.dtype, rows.dtype)
        pre = torch.einsum("bd,bkd->bk", xc.to(dtype), rows.to(dtype)) + b_enc[idx]
        live = pre.relu().to(vals.dtype)
        return vals + (live - live.detach())  # vals' values, the recomputation's gradient
    from sae.kernels.triton_ops import SelectedEncode

    return SelectedEncode.apply(x, W_enc, b_enc, b_pre, vals, idx, deterministic)


def topk_decode(
    vals: torch.Tensor,
    idx: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    backend: str | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """x̂ = b_dec + Σ_i vals[:, i] · W_dec[idx[:, i]]."""
    _check_sparse(vals, idx, W_dec)
    _check_shape("b_dec", b_dec, "D", W_dec.shape[1])
    _check_devices(vals=vals, idx=idx, W_dec=W_dec, b_dec=b_dec)
    if not _use_triton(vals, backend):
        return reference.topk_decode(vals, idx, W_dec, b_dec)
    from sae.kernels.triton_ops import TopKDecode

    return TopKDecode.apply(vals, idx, W_dec, b_dec, deterministic)


def hierarchical_loss(
    vals: torch.Tensor,
    idx: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    x: torch.Tensor,
    every: int = 1,
    *,
    backend: str | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """mean over rows and j ∈ J of ||x − x̂_j||², x̂_j = b_dec + Σ_{i≤j} vals_i · W_dec[idx_i]."""
    _check_sparse(vals, idx, W_dec)
    _check_shape("b_dec", b_dec, "D", W_dec.shape[1])
    _check_shape("x", x, "B,D", vals.shape[0], W_dec.shape[1])
    _check_devices(vals=vals, idx=idx, W_dec=W_dec, b_dec=b_dec, x=x)
    if vals.shape[0] == 0:  # the mean over no rows: NaN on the reference, so refused on both
        raise ValueError("hierarchical_loss needs at least one row, got an empty batch (B = 0)")
    loss_indices(max(vals.shape[1], 1), every)  # validates `every`
    if not _use_triton(vals, backend):
        return reference.hierarchical_loss(vals, idx, W_dec, b_dec, x, every)
    from sae.kernels.triton_ops import HierarchicalLoss

    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (vals, W_dec, b_dec, x))
    return HierarchicalLoss.apply(vals, idx, W_dec, b_dec, x, every, want_grad, deterministic)
