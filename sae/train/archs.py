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
from sae.train.config import MAX_SPARSE_K
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
    # rows short of them; the trainer keeps it), None when unchanged
    candidates: int | None = None
    # batchtopk's sparse path: rows of this rank short of candidates, encoded in full (no grad)
    dense_rows: int = 0


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
# candidates for the batch-wide cut; rows that might hold more above the cut are encoded in
# full, and the candidates double for the batches after.
CANDIDATES_PER_K = 4
# ... and never more than the sparse kernels take per row (their K limit).
MAX_CANDIDATES = MAX_SPARSE_K
# Rows keep different numbers of activations; the sparse kernels take a fixed K per row. Each
# row's kept prefix is cut into pieces of PACK_WIDTH, one kernel row per piece, and the pieces'
# decodes are summed back per row: one encode and one decode call for the whole batch.
PACK_WIDTH = 64
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
    the cut. Such "short" rows are encoded in full without gradient, the cut is taken again
    with their full rows, and their kept activations join the others' in the sparse decode.
    After such a batch the Forward asks for twice the candidates (at most MAX_CANDIDATES) from
    then on. The price is one host sync per step (two when rows were short); the all-dense
    path's (B, F) decode and backward cost several times the sparse step at Gemma-2-2B shape.
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


def _batchtopk_counts(cand: torch.Tensor, cut: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
    """Each row's number of kept candidates (0 for short rows: they are taken in full)."""
    keep = (cand >= cut) & (cand > 0) & ~short[:, None]  # rows sorted: kept entries are a prefix
    return keep.sum(1)


def _piece_counts(counts: torch.Tensor, width: int) -> torch.Tensor:
    """Pieces of `width` per row holding counts[r] kept activations."""
    return (counts + width - 1) // width


def _pieces(
    rows: torch.Tensor | None,
    vals: torch.Tensor,
    idx: torch.Tensor,
    counts: torch.Tensor,
    n_pieces: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows whose kept activations are a sorted prefix (row r of vals/idx keeps counts[r]),
    cut into pieces of `width`: per piece its row (in `rows`, or r itself when None), its
    number within the row, its values, latents and which of its columns are kept."""
    n_rows, device = vals.shape[0], vals.device
    pieces = _piece_counts(counts, width)
    # piece q of row r: its kernel row is first[r] + q, its columns q·width … q·width + width − 1
    local = torch.repeat_interleave(
        torch.arange(n_rows, device=device), pieces, output_size=n_pieces
    )
    first = torch.cumsum(pieces, 0) - pieces
    piece_no = torch.arange(n_pieces, device=device) - first[local]
    cols = piece_no[:, None] * width + torch.arange(width, device=device)
    kept_mask = cols < counts[local, None]
    cols = cols.clamp(max=vals.shape[1] - 1)
    row_of = local if rows is None else rows[local]
    return row_of, piece_no, vals[local[:, None], cols], idx[local[:, None], cols], kept_mask


def _batchtopk_pieces(
    sae: SparseAutoencoder,
    target: torch.Tensor,
    groups: list[tuple],
    width: int,
    encoder_bf16: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Decode every row's kept activations, cut into pieces of `width` (`groups`: `_pieces`'
    arguments, one tuple per set of rows): one encode and one decode call for the batch.
    Returns the rows' decodes without b_dec, the latents that fired, the number of kept
    activations and the kept values."""
    row_of, piece_no, c, i, kept_mask = (
        torch.cat(part) for part in zip(*(_pieces(*g, width) for g in groups), strict=True)
    )
    with _encoder_autocast(target, encoder_bf16):
        vals = encode_selected(
            target[row_of], sae.W_enc, sae.b_enc, c, i, b_pre=sae.b_dec, deterministic=deterministic
        )
    vals = vals * kept_mask
    zero = torch.zeros_like(sae.b_dec)
    parts = topk_decode(vals, i, sae.W_dec, zero, deterministic=deterministic)
    # Sum the pieces back per row: one index_add (atomic adds on CUDA), or when deterministic
    # one per piece number, so no row is added to twice in one call (a row is in one group)
    full = target.new_zeros(target.shape)
    if not deterministic:
        full = full.index_add(0, row_of, parts)
    else:
        by_piece, start = torch.argsort(piece_no, stable=True), 0
        for n_q in torch.bincount(piece_no).tolist():  # pieces numbered q, q = 0, 1, …
            sel = by_piece[start : start + n_q]
            full = full.index_add(0, row_of[sel], parts[sel])
            start += n_q
    kept = vals.detach()
    fired = _fired_from_sparse(kept, i, sae.cfg.n_latents)
    return full, fired, (kept > 0).sum(), [kept.float().reshape(-1)]


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
    whether some row (on some rank) was short of candidates."""
    cfg = sae.cfg
    n_rows = target.shape[0]
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
    width = min(PACK_WIDTH, n_cand)
    counts = _batchtopk_counts(cand32, cut, short)
    n_pieces = _piece_counts(counts, width).sum().reshape(1)
    sync = [any_short.float(), short.sum().reshape(1).float(), n_pieces.float()]
    flags = torch.cat(sync).tolist()  # the step's host sync
    groups = [(None, cand, cand_idx, counts, int(flags[2]))]
    if flags[0]:
        # Short rows' full activations (no gradient: their kept ones are decoded sparsely like
        # every other row's), and the cut again over them and the other rows' candidates:
        # exact, as every other row's last candidate stays below the new cut (more values can
        # only raise the n_keep-th largest).
        short_rows = torch.argsort((~short).to(torch.int8), stable=True)[: int(flags[1])]
        with torch.no_grad(), _encoder_autocast(target, encoder_bf16):
            rows = centered.index_select(0, short_rows)
            # topk_encode's formula (the bias inside addmm: bf16(mm + b) under autocast), so a
            # short row's candidates keep their values in the pool and the cut can only rise
            pre = torch.addmm(sae.b_enc.to(rows.dtype), rows, sae.W_enc.to(rows.dtype).T)
        dense_acts = pre.float().relu()
        pool = torch.cat(
            [cand32.masked_fill(short[:, None], 0).reshape(-1), dense_acts.reshape(-1)]
        )
        cut = _batch_cut(pool, n_keep, info)
        counts = _batchtopk_counts(cand32, cut, short)
        short_counts = ((dense_acts >= cut) & (dense_acts > 0)).sum(1)
        # (this rank may have no short rows when another rank had some)
        widest = torch.cat([short_counts, short_counts.new_zeros(1)]).max().reshape(1)
        sync = [_piece_counts(c, width).sum().reshape(1) for c in (counts, short_counts)]
        sync.append(widest)
        n_pieces, n_short_pieces, widest = torch.cat(sync).tolist()  # a second sync
        groups = [(None, cand, cand_idx, counts, n_pieces)]
        if n_short_pieces:
            # each short row's kept activations as a sorted prefix, like the candidates
            s_vals, s_idx = dense_acts.topk(widest, dim=1, sorted=True)
            s_vals = s_vals.to(cand.dtype)
            groups.append(
                (short_rows, s_vals, s_idx.to(cand_idx.dtype), short_counts, n_short_pieces)
            )
    full = target.new_zeros(target.shape)
    fired = torch.zeros(cfg.n_latents, dtype=torch.bool, device=cand.device)
    n_active, kept_values = torch.zeros((), device=cand.device), []
    groups = [g for g in groups if g[-1]]
    if groups:
        full, fired, n_active, kept_values = _batchtopk_pieces(
            sae, target, groups, width, encoder_bf16, deterministic
        )
    kept_values.append(cand32.new_zeros(1))  # never empty (a kept value is > 0)
    full = full + sae.b_dec
    l0 = n_active.float() / n_rows
    fwd = _batchtopk_forward(full, target, centered, fired, l0, torch.cat(kept_values), info)
    fwd.dense_rows = int(flags[1])
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
