"""Training-time forward passes and losses, one per architecture, plus the AuxK dead-latent loss.

Every function takes a model-space batch and returns a `Forward`: the loss to minimise and what
the trainer needs for metrics and dead-latent tracking. Sparse encode/decode and the
hierarchical loss go through `sae.kernels` (Triton on CUDA, PyTorch on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae.kernels import (
    encode_selected,
    hierarchical_loss,
    knobs,
    topk_decode,
    topk_encode,
    uses_triton,
)
from sae.runtime import RankInfo
from sae.train import distributed as ddp
from sae.train.model import SparseAutoencoder


@dataclass
class Forward:
    """One batch's loss and the detached pieces the trainer tracks."""

    loss: torch.Tensor  # scalar to backpropagate (main loss, before AuxK)
    target: torch.Tensor  # (B, D) input in SAE space
    centered: torch.Tensor  # (B, D) target − b_dec (keeps the graph to b_dec)
    fired: torch.Tensor  # (F,) bool: latents active on some row of this batch
    l0: torch.Tensor  # scalar: mean active latents per row
    recon: Callable[[], torch.Tensor]  # (B, D) full reconstruction, detached (computed lazily)
    min_kept: torch.Tensor | None = None  # batchtopk: smallest kept positive activation (θ)
    # batchtopk's sparse path: per-row candidates to take from now on (more after a batch had
    # to go dense; the trainer keeps it), None when unchanged
    candidates: int | None = None
    dense_rows: int = 0  # batchtopk's sparse path: rows of this rank it decoded densely


def _fired_from_sparse(vals: torch.Tensor, idx: torch.Tensor, n_latents: int) -> torch.Tensor:
    """(F,) bool of latents with a positive value somewhere (no host sync, unlike masking)."""
    counts = torch.zeros(n_latents, dtype=torch.int32, device=idx.device)
    counts.index_add_(0, idx.reshape(-1), (vals > 0).reshape(-1).to(torch.int32))
    return counts > 0


def _encoder_autocast(x: torch.Tensor, bf16: bool):
    """bf16 autocast around an encoder matmul (CUDA only): the (B, F) pre-activations come out
    bf16 and the top-k is taken over them; decoders and losses stay fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and x.is_cuda)


def _sq_err(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (recon - target).pow(2).sum(-1).mean()


def forward_topk(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    hierarchical: bool,
    deterministic: bool = False,
    encoder_bf16: bool = False,
) -> Forward:
    """Per-token top-k; the loss is either the plain error or the hierarchical prefix mean."""
    cfg = sae.cfg
    target = x.to(sae.W_enc.dtype) * cfg.input_scale
    centered = target - sae.b_dec
    det = {"deterministic": deterministic}
    # b_pre rather than `centered`: b_dec's encoder-side gradient is then one GEMV, not a
    # (B, D) gather over W_enc.
    with _encoder_autocast(target, encoder_bf16):
        vals, idx = topk_encode(target, sae.W_enc, sae.b_enc, cfg.k, b_pre=sae.b_dec, **det)
    if hierarchical:
        loss = hierarchical_loss(vals, idx, sae.W_dec, sae.b_dec, target, cfg.loss_every, **det)

        def recon() -> torch.Tensor:
            with torch.no_grad():
                return topk_decode(vals.detach(), idx, sae.W_dec.detach(), sae.b_dec.detach())
    else:
        full = topk_decode(vals, idx, sae.W_dec, sae.b_dec, **det)
        loss = _sq_err(full, target)

        def recon() -> torch.Tensor:
            return full.detach()

    fired = _fired_from_sparse(vals.detach(), idx, cfg.n_latents)
    l0 = (vals.detach() > 0).sum(-1).float().mean()
    return Forward(loss, target, centered, fired, l0, recon)


# BatchTopK's sparse path starts from each row's CANDIDATES_PER_K·k largest activations as
# candidates for the batch-wide cut; rows that might hold more above the cut are encoded and
# decoded densely, and the candidates double for the batches after.
CANDIDATES_PER_K = 4
# ... and never more than the sparse kernels take per row (their K limit).
MAX_CANDIDATES = 1024  # sae.kernels.triton_ops.MAX_K
# SAE_BATCHTOPK=sparse|dense forces a path (benchmarks, tests); auto (default): sparse where the
# Triton kernels run.
BATCHTOPK_ENV = "SAE_BATCHTOPK"


def forward_batchtopk(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    encoder_bf16: bool = False,
    info: RankInfo | None = None,
    deterministic: bool = False,
    sparse: bool | None = None,
    candidates: int | None = None,
) -> Forward:
    """Keep the n·k largest activations of the whole batch (some rows get more, some fewer;
    ties at the cut are all kept).

    Under torchrun "the whole batch" is the global one: the cut is the n·k-th largest value over
    all ranks, so 2 ranks train like 1 process on both halves.

    `sparse` (default: SAE_BATCHTOPK, else where the Triton kernels run) selects from each row's
    top CANDIDATES_PER_K·k (or `candidates`) and decodes with the sparse kernels, exactly: a row
    can only hold kept activations beyond its candidates if its last candidate is at or above
    the cut, and such rows are encoded and decoded densely (the cut is taken again with their
    full rows). After such a batch the Forward asks for twice the candidates (at most
    MAX_CANDIDATES) from then on. The price is one host sync per step (two when rows went
    dense); the all-dense path's (B, F) decode and backward cost several times the sparse step
    at Gemma-2-2B shape.
    """
    cfg = sae.cfg
    target = x.to(sae.W_enc.dtype) * cfg.input_scale
    centered = target - sae.b_dec
    world = 1 if info is None else info.world_size
    n_keep = min(target.shape[0] * cfg.n_latents, target.shape[0] * world * cfg.k)
    if sparse is None:
        path = knobs.choice(BATCHTOPK_ENV, ("auto", "sparse", "dense"))
        sparse = uses_triton(target) if path == "auto" else path == "sparse"
    if not sparse:
        return _batchtopk_dense(sae, target, centered, n_keep, encoder_bf16, info)
    most = min(cfg.n_latents, MAX_CANDIDATES)
    n_cand = min(most, candidates or CANDIDATES_PER_K * cfg.k)
    fwd, any_short = _batchtopk_sparse(
        sae, target, centered, n_keep, encoder_bf16, info, deterministic, n_cand
    )
    if any_short and n_cand < most:
        fwd.candidates = min(most, 2 * n_cand)
    return fwd


def _width_buckets(cap: int) -> list[int]:
    """Decode widths 16, 24, 32, 48, 64, 96, … up to `cap` (the last is `cap`): each row decodes
    at the first width that holds its kept activations, so padding costs at most 1.5×, and the
    sparse kernels (compiled once per width) compile a handful of times per run, not every step
    (an exact width each step cost 395 ms a step on an H200)."""
    widths = [16]
    while widths[-1] < cap:
        w = widths[-1]
        widths.append(w * 3 // 2 if w & (w - 1) == 0 else w * 4 // 3)
    return [w for w in widths if w < cap] + [cap]


def _batch_cut(acts: torch.Tensor, n_keep: int, info: RankInfo | None) -> torch.Tensor:
    """The n_keep-th largest of acts over the batch (over all ranks under torchrun)."""
    return ddp.global_threshold(acts, n_keep, info or RankInfo())


def _min_kept(kept: torch.Tensor, info: RankInfo | None) -> torch.Tensor:
    """Smallest kept positive activation (inf when none), over ranks: the inference θ's input."""
    inf = kept.new_full((1,), float("inf"))
    min_kept = torch.cat([kept.masked_fill(kept <= 0, float("inf")).reshape(-1), inf]).min()
    if info is not None:
        min_kept = ddp.min_over_ranks(min_kept.reshape(1), info)[0]  # the global batch's
    return min_kept


def _batchtopk_groups(
    cand: torch.Tensor, cut: torch.Tensor, short: torch.Tensor, widths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which candidates are kept, each row's group (the index of the first width holding its
    kept count; len(widths) for the short rows, decoded densely) and the groups' sizes."""
    keep = (cand >= cut) & (cand > 0) & ~short[:, None]  # rows sorted: kept entries are a prefix
    group = torch.bucketize(keep.sum(1), widths)
    group = group.masked_fill(short, widths.numel())
    return keep, group, torch.bincount(group, minlength=widths.numel() + 1)


def _batchtopk_sparse(
    sae: SparseAutoencoder,
    target: torch.Tensor,
    centered: torch.Tensor,
    n_keep: int,
    encoder_bf16: bool,
    info: RankInfo | None,
    deterministic: bool,
    n_cand: int,
) -> tuple[Forward, bool]:
    """BatchTopK from each row's n_cand largest activations with the sparse kernels, and
    whether some row (on some rank) was short of candidates and went dense."""
    cfg = sae.cfg
    with torch.no_grad(), _encoder_autocast(target, encoder_bf16):
        cand, cand_idx = topk_encode(target, sae.W_enc, sae.b_enc, n_cand, b_pre=sae.b_dec)
    cand32 = cand.float()
    cut = _batch_cut(cand32, n_keep, info)
    last = cand32[:, -1]
    # a short row may hold kept activations beyond its candidates (none when n_cand = F)
    short = (last > 0) & (last >= cut) if n_cand < cfg.n_latents else torch.zeros_like(last) > 0
    any_short = short.any().reshape(1)
    if info is not None:
        any_short = ddp.any_rank(any_short, info)  # any rank short: all take the cut again
    # Rows are grouped by the width that holds their kept count, one decode per group: rows
    # keep very different counts (at Gemma-2-2B shape, k = 128, the widest ~1000), and one
    # decode as wide as the widest row would do several times the work.
    widths_list = _width_buckets(n_cand)
    widths = torch.tensor(widths_list, device=cand.device)
    keep, group, sizes = _batchtopk_groups(cand32, cut, short, widths)
    flags = torch.cat([any_short.float(), sizes.float()]).tolist()  # the one sync, usually
    dense_acts = None
    if flags[0]:
        # Short rows in full (with gradients: they are decoded densely), and the cut again over
        # them and the other rows' candidates: exact, as every other row's last candidate stays
        # below the new cut (more values can only raise the n_keep-th largest).
        with _encoder_autocast(target, encoder_bf16):
            pre = centered[short] @ sae.W_enc.T + sae.b_enc
        dense_acts = pre.float().relu()
        pool = torch.cat(
            [cand32.masked_fill(short[:, None], 0).reshape(-1), dense_acts.reshape(-1)]
        )
        cut = _batch_cut(pool.detach(), n_keep, info)
        keep, group, sizes = _batchtopk_groups(cand32, cut, short, widths)
        flags = [1.0, *sizes.tolist()]
    groups = [(g, int(n)) for g, n in enumerate(flags[1:]) if n]
    order = None if len(groups) == 1 else torch.argsort(group, stable=True)
    outs, fired, n_active, kept_values, start = [], None, 0, [], 0
    for g, n_rows in groups:
        rows = None if order is None else order[start : start + n_rows]
        start += n_rows
        if g == len(widths_list):  # the short rows, in batch order (as centered[short] took them)
            kept_dense = dense_acts * ((dense_acts >= cut) & (dense_acts > 0))
            outs.append(sae.decode_dense(kept_dense))
            kept = kept_dense.detach()
            i = None
        else:
            width = widths_list[g]
            c, i, k, x_part = cand[:, :width], cand_idx[:, :width], keep[:, :width], target
            if rows is not None:
                c, i, k, x_part = c[rows], i[rows], k[rows], target[rows]
            with _encoder_autocast(target, encoder_bf16):
                vals = encode_selected(
                    x_part, sae.W_enc, sae.b_enc, c, i, b_pre=sae.b_dec, deterministic=deterministic
                )
            vals = vals * k
            outs.append(topk_decode(vals, i, sae.W_dec, sae.b_dec, deterministic=deterministic))
            kept = vals.detach()
        part_fired = (kept > 0).any(0) if i is None else _fired_from_sparse(kept, i, cfg.n_latents)
        fired = part_fired if fired is None else fired | part_fired
        n_active = n_active + (kept > 0).sum()
        kept_values.append(kept.float().reshape(-1))
    full = outs[0]
    if order is not None:  # back to the batch's row order (each row once: deterministic)
        full = torch.cat(outs).index_select(0, torch.argsort(order))
    l0 = n_active.float() / target.shape[0]
    fwd = _batchtopk_forward(full, target, centered, fired, l0, torch.cat(kept_values), info)
    fwd.dense_rows = int(flags[-1])
    return fwd, bool(flags[0])


def _batchtopk_forward(full, target, centered, fired, l0, kept_values, info) -> Forward:
    """The Forward of either BatchTopK path; `kept_values` are the kept activations the
    inference θ is estimated from."""
    return Forward(
        _sq_err(full, target),
        target,
        centered,
        fired,
        l0,
        lambda: full.detach(),
        _min_kept(kept_values, info),
    )


def _batchtopk_dense(
    sae: SparseAutoencoder,
    target: torch.Tensor,
    centered: torch.Tensor,
    n_keep: int,
    encoder_bf16: bool,
    info: RankInfo | None,
) -> Forward:
    """BatchTopK over the dense (B, F) activations: the reference, and the fallback."""
    with _encoder_autocast(target, encoder_bf16):
        pre = centered @ sae.W_enc.T + sae.b_enc
    acts = pre.float().relu()
    with torch.no_grad():
        keep = acts >= _batch_cut(acts, n_keep, info)
    sparse = acts * keep
    full = sae.decode_dense(sparse)
    active = sparse.detach() > 0
    l0 = active.sum(-1).float().mean()
    return _batchtopk_forward(
        full, target, centered, active.any(0), l0, sparse.detach()[keep], info
    )


class _JumpReLU(torch.autograd.Function):
    """z·H(z − θ); dz passes where active, dθ by the rectangle-kernel pseudo-derivative."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        near = ((z - theta).abs() < eps / 2).to(grad.dtype)
        d_theta = (-(theta / eps) * near * grad).sum(0)
        return grad * (z > theta), d_theta, None


class _Step(torch.autograd.Function):
    """H(z − θ); no gradient to z, dθ = −(1/ε)·K((z − θ)/ε) with K the unit rectangle."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        near = ((z - theta).abs() < eps / 2).to(grad.dtype)
        return torch.zeros_like(z), (-(1.0 / eps) * near * grad).sum(0), None


def forward_jumprelu(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    l0_coef: float,
    bandwidth: float,
    encoder_bf16: bool = False,
) -> Forward:
    """Reconstruction error + l0_coef·L0, thresholds trained through straight-through estimates."""
    cfg = sae.cfg
    target = x.to(sae.W_enc.dtype) * cfg.input_scale
    centered = target - sae.b_dec
    with _encoder_autocast(target, encoder_bf16):
        pre = centered @ sae.W_enc.T + sae.b_enc
    pre = pre.float()
    acts = _JumpReLU.apply(pre, sae.threshold, bandwidth)
    full = sae.decode_dense(acts)
    l0 = _Step.apply(pre, sae.threshold, bandwidth).sum(-1).mean()
    loss = _sq_err(full, target) + l0_coef * l0
    active = acts.detach() > 0
    return Forward(loss, target, centered, active.any(0), l0.detach(), lambda: full.detach(), None)


def auxk_loss(
    sae: SparseAutoencoder,
    fwd: Forward,
    dead: torch.Tensor,
    aux_k: int,
    deterministic: bool = False,
) -> torch.Tensor | None:
    """Gao et al.'s AuxK: the top-k_aux dead latents reconstruct the main residual.

    Only dead latents' encoder rows are evaluated, so the cost scales with how many are dead.
    Returns None when no latent is dead.
    """
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return None
    residual = fwd.target - fwd.recon()
    pre = fwd.centered @ sae.W_enc[dead_idx].T + sae.b_enc[dead_idx]
    vals, local = pre.topk(min(aux_k, dead_idx.numel()), dim=-1, sorted=True)
    zero_bias = torch.zeros_like(sae.b_dec)
    aux_recon = topk_decode(
        vals.relu(), dead_idx[local], sae.W_dec, zero_bias, deterministic=deterministic
    )
    return _sq_err(aux_recon, residual).nan_to_num(0.0)


def forward(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    l0_coef: float,
    bandwidth: float,
    deterministic: bool = False,
    encoder_bf16: bool = False,
    info: RankInfo | None = None,
    batchtopk_candidates: int | None = None,
) -> Forward:
    """Dispatch on cfg.arch (`deterministic`: bitwise-repeatable GPU kernels, a bit slower;
    `encoder_bf16`: encoder matmul under bf16 autocast on CUDA; `info`: the torchrun ranks, for
    BatchTopK's global selection; `batchtopk_candidates`: what the last Forward.candidates
    asked for)."""
    arch = sae.cfg.arch
    if arch in ("hierarchical", "topk"):
        return forward_topk(sae, x, arch == "hierarchical", deterministic, encoder_bf16)
    if arch == "batchtopk":
        return forward_batchtopk(
            sae, x, encoder_bf16, info, deterministic, candidates=batchtopk_candidates
        )
    return forward_jumprelu(sae, x, l0_coef, bandwidth, encoder_bf16)
