"""autograd.Functions around the Triton kernels: launch geometry, gradient scaling, determinism.

The hierarchical loss computes its gradients in the forward pass (one gather of the dictionary
rows serves the loss and every gradient) and only scales them by the incoming gradient in
backward (W_dec's in place, so a graph takes one backward); under no_grad the same kernel runs with the gradient work compiled out.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from sae.kernels import knobs
from sae.kernels.reference import loss_indices
from sae.kernels.topk import row_topk
from sae.kernels.triton_kernels import (
    hierarchical_kernel,
    scale_inplace_kernel,
    segment_rows_kernel,
    sparse_sweep_kernel,
)

MAX_K = 1024  # K of the row kernels and the top-k; decodes split larger K (k_runs)
# Tests set SAE_KERNELS_POISON=1: outputs the kernels must fully write start as NaN, so an
# element a kernel forgot to write fails the comparison instead of passing as stale zeros.
POISON_ENV = "SAE_KERNELS_POISON"
# Benchmark knob (read at call time): how the sparse ops accumulate W's gradient rows.
WGRAD_ENV = "SAE_KERNELS_WGRAD"  # segment (default) | atomic
STAGES_ENV = "SAE_KERNELS_STAGES"  # steps of loads in flight in the row kernels' sweeps
# elements of W and of the step-major (K, B) arrays up to which the row kernels' offsets into
# them are int32 (cheaper in their loops); per-program offsets are int64 whatever the size
INT32_OFFSETS_BELOW = 2**31
UNROLL_ENV = "SAE_KERNELS_UNROLL"  # steps per iteration of the row kernels' sweeps (1: none)


def check_k(k: int) -> None:
    """The limit on K of the row kernels and the top-k (the decode ops split larger K)."""
    if k > MAX_K:
        raise ValueError(f"k must be at most {MAX_K} for the Triton kernels, got {k}")


def k_runs(k: int) -> list[slice]:
    """0..k in runs of at most MAX_K steps, for ops linear in the values (one run up to MAX_K)."""
    return [slice(s, min(k, s + MAX_K)) for s in range(0, k, MAX_K)]


def _tile(env: str, default: tuple[int, int, int], d: int, k: int | None = None):
    """A kernel's (rows or items, BLOCK_D, num_warps) from `env` or `default`, BLOCK_D clamped to
    [16, next_pow2(d)]; with k, also the row kernels' limit on K."""
    if k is not None:
        check_k(k)
    rows, bd, warps = knobs.tile(env, default)
    return rows, max(16, min(bd, triton.next_power_of_2(d))), warps


def _hier_geometry(k: int, d: int, want_grad: bool) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps) of the hierarchical kernel: rows x columns per program.

    The kernel steps over K with the tile's rows independent (no scan over K): earlier versions
    that held K rows of one token per tile spent most of their time in tl.cumsum over K.
    SAE_KERNELS_HIER_TILE="bb,bd,warps" overrides, for tuning runs.
    """
    # Tuned on the H100 (docs/kernels-notes.md §21, §28): with gradients (32, 32, 8) — 5.31 ms
    # at B=8192 K=128 (two steps per iteration, 4 stages) against 5.9-11.2 for the other tiles;
    # the forward alone (no grad, 6 stages) is faster on (64, 64, 8): 1.6 vs 2.1 ms.
    default = (32, 32, 8) if want_grad else (64, 64, 8)
    return _tile("SAE_KERNELS_HIER_TILE", default, d, k)


def _hier_pipeline(want_grad: bool) -> tuple[int, int]:
    """(pipeline stages, steps per loop iteration) of the hierarchical kernel's sweeps.

    With gradients, two steps per iteration and 4 stages: 5.35 ms against 5.79 for one step and
    6 stages (H100, B=8192 K=128, docs/kernels-notes.md §28) — fewer loop and address
    instructions per step in an issue-heavy loop. The no-grad forward is best as it was.
    SAE_KERNELS_STAGES / SAE_KERNELS_UNROLL override both.
    """
    stages, unroll = (4, 2) if want_grad else (6, 1)
    return knobs.integer(STAGES_ENV, stages), knobs.integer(UNROLL_ENV, unroll)


def _new(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled when poisoning is on (see POISON_ENV)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV) == "1":
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def _segment_geometry(d: int) -> tuple[int, int, int]:
    """(BLOCK_P items, BLOCK_D columns, num_warps) of the segment reduction.

    SAE_KERNELS_SEG_TILE="bp,bd,warps" overrides, for tuning runs.
    """
    # Small tiles won on the H100 (W_enc's gradient, B=8192 K=128: 1.80 ms at (8, 64, 1), 2.05 at
    # (4, 64, 1), 2.8 at (8, 64, 2), 6.3 at (16, 128, 4); atomics 3.5): many resident programs
    # hide the latency of each segment's dependent order -> row loads.
    return _tile("SAE_KERNELS_SEG_TILE", (8, 64, 1), d)


def latent_segments(idx: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, seg): the flattened (b, k) items stably sorted by latent, and each latent's
    segment [seg[f], seg[f + 1]) of that order (empty for latents that never appear)."""
    flat = idx.reshape(-1)
    order = torch.sort(flat.to(torch.int32), stable=True).indices
    seg = torch.zeros(n_latents + 1, dtype=torch.int64, device=idx.device)
    seg[1:] = torch.bincount(flat, minlength=n_latents).cumsum(0)
    return order, seg


def _segment_add(
    out: torch.Tensor,
    segs: tuple[torch.Tensor, torch.Tensor],
    src: torch.Tensor,
    coef: torch.Tensor | None,
    row_div: int,
    d_start: int,
    d_end: int,
) -> None:
    """out[f, d_start:d_end] = Σ coef · src rows over latent f's segment, every row written."""
    order, seg = segs
    n_seg = seg.numel() - 1
    if n_seg == 0 or d_end <= d_start:
        return
    block_p, block_d, warps = _segment_geometry(d_end - d_start)
    grid = (n_seg, triton.cdiv(d_end - d_start, block_d))
    segment_rows_kernel[grid](
        out,
        src,
        coef if coef is not None else src,
        order,
        seg,
        d_start,
        d_end,
        d_start if row_div == 1 else 0,
        row_div,
        src.stride(0),
        out.stride(0),
        HAS_COEF=coef is not None,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
        num_warps=warps,
    )


def _segment_sum(values: torch.Tensor, segs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-latent fp32 sums of the flattened values: the segment reduction over one column, each
    latent summed by one program in a fixed order (CUDA's float cumsum is not deterministic)."""
    out = _new((segs[1].numel() - 1, 1), torch.float32, values.device)
    _segment_add(out, segs, values.float().reshape(-1, 1), None, 1, 0, 1)
    return out[:, 0]


def _transposed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous (K, B) copy of a (B, K) tensor in `dtype`, in one pass."""
    out = torch.empty(t.shape[::-1], dtype=dtype, device=t.device)
    return out.copy_(t.T)


def _step_major(
    vals: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, B) copies of vals (fp32) and of the row offsets idx · stride(W) / row_align(W): what
    the row kernels read, one contiguous run per step for a block of rows. Offsets are int32 when
    every element of W is within 2^31 of its start and K·B < 2^31 (the kernels then skip a 64-bit
    multiply per row and step), else int64, which also makes the kernels' step offsets into
    these (K, B) arrays 64-bit. vals are fp32 whatever their dtype: 2-byte loads cannot be
    asynchronous copies, so bf16 values would be loaded synchronously inside the pipelined loops.
    """
    stride = w.stride(0)
    narrow = max(w.shape[0] * stride, vals.numel()) < INT32_OFFSETS_BELOW
    dtype = torch.int32 if narrow else torch.int64
    return _transposed(vals, torch.float32), _transposed(idx * (stride // row_align(w)), dtype)


def row_align(w: torch.Tensor) -> int:
    """The largest power of two up to 16 dividing W's row stride (a hint for the row kernels)."""
    return math.gcd(w.stride(0), 16)


def _sweep_geometry(k: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps) of sparse_sweep_kernel: rows x columns per program.

    SAE_KERNELS_SWEEP_TILE="bb,bd,warps" overrides, for tuning runs.
    """
    # H100, B=8192 K=128, TopK op: 6.03 ms at (64, 64, 8) vs 6.16-6.81 for four other tiles
    # (decode alone 1.58 ms; the [K, BLOCK_D] register-tile kernels this replaced: 6.30 / 2.10).
    return _tile("SAE_KERNELS_SWEEP_TILE", (64, 64, 8), d, k)


def _sweep(out, dots, gw, vals_t, off_t, w, bias, vec, dot_atomic=True) -> None:
    """Launch sparse_sweep_kernel over (row blocks, D-chunks) in the modes its arguments ask for."""
    k, n = off_t.shape
    assert gw is None or gw.stride() == w.stride(), "gW shares W's row offsets"
    d = w.shape[1]
    block_b, block_d, warps = _sweep_geometry(k, d)
    grid = (triton.cdiv(n, block_b), triton.cdiv(d, block_d))
    dummy = w
    sparse_sweep_kernel[grid](
        out if out is not None else dummy,
        dots if dots is not None else dummy,
        gw if gw is not None else dummy,
        vals_t,
        off_t,
        w,
        bias if bias is not None else dummy,
        vec if vec is not None else dummy,
        n,
        d,
        out.stride(0) if out is not None else 0,
        vec.stride(0) if vec is not None else 0,
        dots.stride(0) if dots is not None and dots.dim() == 3 else 0,
        K=k,
        DECODE=out is not None,
        HAS_BIAS=bias is not None,
        DOT=dots is not None,
        DOT_ATOMIC=dot_atomic,
        SCATTER=gw is not None,
        EVEN_D=d % block_d == 0,
        ALIGN=row_align(w),
        STAGES=knobs.integer(STAGES_ENV, 6),
        UNROLL=knobs.integer(UNROLL_ENV, 1),
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        num_warps=warps,
    )


def sparse_decode(vals, idx, w, bias, out_dtype) -> torch.Tensor:
    """(B, D) = bias + Σ_k vals[:, k] · w[idx[:, k]] (bias may be None).

    K above MAX_K: the decode is linear in vals, so runs of MAX_K steps are decoded in fp32 and
    summed, the bias added by the first only.
    """
    runs = k_runs(idx.shape[1])
    if len(runs) > 1:
        out = sparse_decode(vals[:, runs[0]], idx[:, runs[0]], w, bias, torch.float32)
        for run in runs[1:]:
            out += sparse_decode(vals[:, run], idx[:, run], w, None, torch.float32)
        return out.to(out_dtype)
    n = idx.shape[0]
    out = _new((n, w.shape[1]), out_dtype, w.device)
    if n > 0:
        _sweep(out, None, None, *_step_major(vals, idx, w), w, bias, None)
    return out


def sparse_outer_backward(
    coef: torch.Tensor,
    idx: torch.Tensor,
    vec: torch.Tensor,
    w: torch.Tensor,
    want_w: bool,
    want_dot: bool,
    deterministic: bool,
    segs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(gW, dots): gW[f] = Σ_{idx[b,k]=f} coef[b,k] · vec[b]; dots[b,k] = <vec[b], w[idx[b,k]]>.

    gW is a segment reduction over the items sorted by latent (each row written once, bitwise
    repeatable); SAE_KERNELS_WGRAD=atomic scatters with atomics instead (for comparison).
    """
    n, k = idx.shape
    w = w.contiguous()  # the atomic path's gW (contiguous) shares W's row offsets
    f, d = w.shape
    atomic = (
        want_w and not deterministic and knobs.choice(WGRAD_ENV, ("segment", "atomic")) == "atomic"
    )
    gw = dots = None
    if want_w:
        gw = (
            torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            if atomic or n == 0
            else _new(w.shape, torch.float32, w.device)
        )
    if want_dot:
        # Step-major (K, B): atomically added over chunks, or per-chunk partials (deterministic).
        if deterministic:
            n_chunks = triton.cdiv(d, _sweep_geometry(min(k, MAX_K), d)[1])
            dots = _new((n_chunks, k, n), torch.float32, w.device)
        else:
            dots = torch.zeros(k, n, dtype=torch.float32, device=w.device)
    if n > 0 and (atomic or want_dot):
        vals_t, off_t = _step_major(coef, idx, w)
        for run in k_runs(k):  # one run up to MAX_K
            _sweep(
                None,
                dots[..., run, :] if dots is not None else None,
                gw if atomic else None,
                vals_t[run],
                off_t[run],
                w,
                None,
                vec,
                not deterministic,
            )
    if want_w and not atomic and n > 0:
        segs = segs if segs is not None else latent_segments(idx, f)
        _segment_add(gw, segs, vec, coef.reshape(-1), k, 0, d)
    if dots is not None:
        dots = (dots.sum(0) if deterministic else dots).T  # (B, K) view
    return gw, dots


def scale_inplace(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t *= scale (a one-element tensor) in place; free when scale is 1."""
    n = t.numel()
    if n:
        block = 4096
        scale_inplace_kernel[(triton.cdiv(n, block),)](t, scale.reshape(1), n, BLOCK=block)
    return t


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x computes in: autocast's where it is on for x's device."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _contig(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in ts]


class HierarchicalLoss(torch.autograd.Function):
    """Fused sparse decode + hierarchical loss; gradients computed eagerly in forward."""

    @staticmethod
    def forward(ctx, vals, idx, w_dec, b_dec, x, every, want_grad, deterministic):
        vals, idx, w_dec, b_dec, x = _contig(vals, idx, w_dec, b_dec, x)
        n, k = idx.shape
        d = w_dec.shape[1]
        n_j = len(loss_indices(k, every))
        block_b, block_d, warps = _hier_geometry(k, d, want_grad)
        stages, unroll = _hier_pipeline(want_grad)
        n_chunks = triton.cdiv(d, block_d)
        dev = w_dec.device
        loss_part = _new((n_chunks, n), torch.float32, dev)
        # Step-major (K, B) copies: each step's loads of a row block's values and row offsets,
        # and its dL/dvals atomics, touch one contiguous run instead of one sector per row.
        vals_t, off_t = _step_major(vals, idx, w_dec)
        gv = gr = gw = None
        # dL/dvals: atomically added into (K, B) by every chunk's program, or per-chunk partials
        # summed afterwards (deterministic; partials were not faster when measured, H100).
        gv_atomic = not deterministic
        if want_grad:
            if gv_atomic:
                gv = torch.zeros((k, n), dtype=torch.float32, device=dev)
            else:
                gv = _new((n_chunks, k, n), torch.float32, dev)
            gr = _new((n, d), torch.float32, dev)
            if deterministic and n > 0:
                gw = _new(w_dec.shape, torch.float32, dev)  # every row written by _segment_add
            else:
                gw = torch.zeros(w_dec.shape, dtype=torch.float32, device=dev)
        scale = -2.0 / max(n * n_j, 1)

        def launch(d_start, d_end, gw_mode, gw_buf):
            grid = (triton.cdiv(n, block_b), triton.cdiv(d_end - d_start, block_d))
            hierarchical_kernel[grid](
                loss_part,
                gv if gv is not None else loss_part,
                gr if gr is not None else loss_part,
                gw_buf if gw_buf is not None else loss_part,
                vals_t,
                off_t,
                w_dec,
                b_dec,
                x,
                n,
                d_start,
                d_end,
                every,
                scale,
                x.stride(0),
                n * k,
                d,
                gw_buf.stride(0) if gw_buf is not None else 0,
                K=k,
                WANT_GRAD=want_grad,
                GW_MODE=gw_mode,
                GV_ATOMIC=gv_atomic,
                EVEN_D=d_start % block_d == 0 and (d_end - d_start) % block_d == 0,
                ALIGN=row_align(w_dec),
                STAGES=stages,
                UNROLL=unroll,
                BLOCK_B=block_b,
                BLOCK_D=block_d,
                num_warps=warps,
            )

        if n > 0:
            if not want_grad:
                launch(0, d, 0, None)
            elif not deterministic:
                launch(0, d, 1, gw)
            else:
                # Materialise v_i·S_i for one D-group at a time (about B·D floats), then reduce
                # each latent's rows in sorted order: bitwise repeatable, no atomics.
                segs = latent_segments(idx, w_dec.shape[0])
                group = block_d * max(1, triton.cdiv(triton.cdiv(d, k), block_d))
                buf = _new((n * k, group), torch.float32, dev)
                for d0 in range(0, d, group):
                    d1 = min(d, d0 + group)
                    launch(d0, d1, 2, buf)
                    _segment_add(gw, segs, buf, None, 1, d0, d1)
        loss = loss_part.sum() / max(n * n_j, 1)
        if want_grad:
            gv = (gv if gv_atomic else gv.sum(0)).T  # (B, K) view of the step-major sums
            ctx.save_for_backward(gv, gr)
        ctx.gw = gw  # not saved: backward scales it in place, so it serves one backward only
        ctx.meta = (n * n_j, vals.dtype, x.dtype, b_dec.dtype, w_dec.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        gv, gr = ctx.saved_tensors
        gw, ctx.gw = ctx.gw, None  # released: a retained graph's second backward must not reuse it
        count, vals_dtype, x_dtype, b_dtype, w_dtype = ctx.meta
        c = 2.0 / max(count, 1)
        g_vals = g_w = g_b = g_x = None
        if ctx.needs_input_grad[0]:
            g_vals = (gv * (-c * grad_out)).to(vals_dtype)
        if ctx.needs_input_grad[2]:
            if gw is None:
                raise RuntimeError(
                    "hierarchical_loss (Triton) supports one backward per forward: its W_dec "
                    "gradient is scaled in place and released by the first; recompute the loss "
                    'for another backward, or use backend="torch"'
                )
            g_w = scale_inplace(gw, grad_out).to(w_dtype)
        if ctx.needs_input_grad[3]:
            g_b = (gr.sum(0) * (-c * grad_out)).to(b_dtype)
        if ctx.needs_input_grad[4]:
            g_x = (gr * (c * grad_out)).to(x_dtype)
        return g_vals, None, g_w, g_b, g_x, None, None, None


class TopKDecode(torch.autograd.Function):
    """x̂ = b_dec + Σ_k vals_k W_dec[idx_k] without a (B, K, D) intermediate."""

    @staticmethod
    def forward(ctx, vals, idx, w_dec, b_dec, deterministic):
        vals, idx, w_dec, b_dec = _contig(vals, idx, w_dec, b_dec)
        out_dtype = torch.promote_types(w_dec.dtype, b_dec.dtype)
        out = sparse_decode(vals, idx, w_dec, b_dec, out_dtype)
        ctx.save_for_backward(vals, idx, w_dec)
        ctx.deterministic = deterministic
        ctx.b_dtype = b_dec.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        vals, idx, w_dec = ctx.saved_tensors
        g = grad_out.contiguous()
        need_v, _, need_w, need_b, _ = ctx.needs_input_grad
        gw, dots = sparse_outer_backward(vals, idx, g, w_dec, need_w, need_v, ctx.deterministic)
        g_vals = dots.to(vals.dtype) if need_v else None
        g_w = gw.to(w_dec.dtype) if need_w else None
        g_b = g.sum(0).to(ctx.b_dtype) if need_b else None
        return g_vals, None, g_w, g_b, None


def _matmul_input(ctx, x: torch.Tensor, b_pre: torch.Tensor | None) -> torch.Tensor:
    """x − b_pre in the dtype the encoder matmul computes in (bf16 under autocast); x's own
    dtype is kept on ctx for dx. W_enc's gradient is taken from this copy: the exact gradient of
    the product computed, and half the bytes for its row gathers under autocast."""
    if b_pre is not None:
        x = x - b_pre
    ctx.x_dtype = x.dtype
    return x.to(_matmul_dtype(x))


def _save_for_encoder_backward(ctx, x_mm, w_enc, b_enc, b_pre, idx, vals, deterministic) -> None:
    ctx.save_for_backward(x_mm, w_enc, idx, vals)
    ctx.deterministic = deterministic
    ctx.b_dtype = b_enc.dtype
    ctx.pre_dtype = b_pre.dtype if b_pre is not None else None


def _encoder_backward(ctx, grad_vals: torch.Tensor) -> tuple:
    """(dx, dW_enc, db_enc, db_pre) from the sparse (B, K) gradient of the relu'd vals; inputs
    (x, W_enc, b_enc, b_pre) come first in both encoder Functions."""
    x, w_enc, idx, vals = ctx.saved_tensors
    need_x, need_w, need_b, need_pre = ctx.needs_input_grad[:4]
    g = (grad_vals.float() * (vals > 0)).contiguous()
    x = x.contiguous()
    g_x = g_w = g_b = g_pre = None
    if need_x:
        g_x = sparse_decode(g, idx, w_enc.contiguous(), None, ctx.x_dtype)
    f = w_enc.shape[0]
    # One latent sort serves W_enc's gradient and, in deterministic mode, b_enc's.
    need_sums = need_b or need_pre
    segs = latent_segments(idx, f) if need_w or (need_sums and ctx.deterministic) else None
    if need_w:
        gw, _ = sparse_outer_backward(g, idx, x, w_enc, True, False, ctx.deterministic, segs)
        g_w = gw.to(w_enc.dtype)
    if need_sums:
        if ctx.deterministic:
            per_latent = _segment_sum(g, segs)
        else:
            per_latent = torch.zeros(f, dtype=torch.float32, device=g.device)
            per_latent.index_add_(0, idx.reshape(-1), g.reshape(-1))
        if need_b:
            g_b = per_latent.to(ctx.b_dtype)
        if need_pre:
            g_pre = -(per_latent @ w_enc.float()).to(ctx.pre_dtype)
    return g_x, g_w, g_b, g_pre


class TopKEncode(torch.autograd.Function):
    """relu(top-k((x − b_pre) W_encᵀ + b_enc)); backward from the sparse (B, K) gradient only.

    With b_pre given and x not requiring grad (the trainer's x = target − b_dec), b_pre's
    gradient is −(db_enc @ W_enc), one (F,)·(F, D) product, instead of a (B, D) gather over W_enc.
    """

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, b_pre, k, deterministic):
        check_k(k)  # before the matmul, not in backward
        x = _matmul_input(ctx, x, b_pre)
        # addmm: the bias rides in the matmul epilogue and, under autocast, the (B, F)
        # pre-activations stay bf16 (a separate `+ b_enc` would promote them to fp32).
        pre = torch.addmm(b_enc.to(x.dtype), x, w_enc.to(x.dtype).T)
        vals, idx = row_topk(pre, k)
        del pre
        vals = vals.relu()
        _save_for_encoder_backward(ctx, x, w_enc, b_enc, b_pre, idx, vals, deterministic)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals, _grad_idx):
        return (*_encoder_backward(ctx, grad_vals), None, None)


class SelectedEncode(torch.autograd.Function):
    """The encoder's relu'd values at latents chosen elsewhere from the same matmul (BatchTopK's
    batch-wide cut over per-row candidates): the values pass through, and the backward is
    TopKEncode's sparse one, so only the chosen (B, K) entries cost anything."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, b_pre, vals, idx, deterministic):
        x = _matmul_input(ctx, x, b_pre)
        _save_for_encoder_backward(ctx, x, w_enc, b_enc, b_pre, idx, vals, deterministic)
        return vals.clone()

    @staticmethod
    def backward(ctx, grad_vals):
        g_vals = grad_vals if ctx.needs_input_grad[4] else None  # vals pass through, as given
        return (*_encoder_backward(ctx, grad_vals), g_vals, None, None)
