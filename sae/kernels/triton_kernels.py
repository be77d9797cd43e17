"""Triton kernels for the sparse SAE ops (written from the math in docs/kernels-notes.md).

The row kernels (`sparse_sweep_kernel` for the TopK ops, `hierarchical_kernel`) own a tile of
(BLOCK_B rows, BLOCK_D columns) and step over K: at step i every row of the tile gathers its
i-th dictionary row's chunk. vals and row offsets come step-major ((K, B)) so a step's loads
for the tile's rows are contiguous, and Triton's software pipeliner keeps several steps of
offset -> row loads in flight. Grids are (row blocks, chunks) with row blocks fastest, so the
programs resident at any moment all read the same D-chunk of the dictionary: that (F, BLOCK_D)
slice stays in L2 while the batch sweeps over it.

Scatter-adds into the (F, D) weight gradients come in two flavours: atomics from the row kernels
(fast, order-dependent), or a segment reduction over the (b, k) pairs sorted by latent
(`segment_rows_kernel`, deterministic: each output row is summed in a fixed order by one program).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_mask(mb, md, EVEN_D: tl.constexpr):
    """[rows, cols] mask; a column-constant one when the chunk has no ragged edge, so the
    compiler can vectorise the row loads and the gradient's atomic adds along D."""
    if EVEN_D:
        return mb[:, None]
    else:
        return mb[:, None] & md[None, :]


@triton.jit
def _step(o_steps, i, B):
    """Offset of step i in the step-major (K, B) arrays: 64-bit where the caller made the row
    offsets int64 (W or K·B past 2^31 elements), else 32-bit (64-bit steps throughout cost the
    hierarchical loss 0.5% at B=8192, K=128 on an H200)."""
    if o_steps.dtype.element_ty == tl.int64:
        return tl.cast(i, tl.int64) * B
    else:
        return i * B


@triton.jit
def _step_rows(v_steps, o_steps, w_cols, B, mb, md, i, EVEN_D: tl.constexpr, ALIGN: tl.constexpr):
    """Step i of a sweep over K for a block of rows: (v_i, row units of idx_i, W[idx_i] chunk).

    vals and the row offsets of idx in units of ALIGN elements (idx · stride(W) / ALIGN, ALIGN a
    power of two dividing the stride) come step-major ((K, B), v_steps / o_steps point at the
    block's rows of step 0), so each step's loads of the block's values and offsets are
    contiguous; w_cols points at the chunk's columns of W's row 0. Offsets precomputed by the
    caller (int32 where they fit) spare every step a 64-bit multiply per row; multiplying the
    units by the constant ALIGN where they are used (also in a later pipeline stage, e.g. the
    gradient's atomics) tells the compiler the rows are aligned, which keeps the row loads and
    atomics vectorised.
    """
    step = _step(o_steps, i, B)
    v = tl.load(v_steps + step, mask=mb, other=0.0).to(tl.float32)
    units = tl.load(o_steps + step, mask=mb, other=0)
    e = tl.load(w_cols + units[:, None] * ALIGN, mask=_tile_mask(mb, md, EVEN_D), other=0.0)
    return v, units, e.to(tl.float32)


@triton.jit
def _in_j(i, every):
    """Whether prefix length i + 1 is in J = {1} ∪ {j : j mod every = 0}."""
    return ((i + 1) == 1) | (((i + 1) % every) == 0)


@triton.jit
def sparse_sweep_kernel(
    out_ptr,
    dots_ptr,
    gw_ptr,
    vals_ptr,
    off_ptr,
    w_ptr,
    bias_ptr,
    vec_ptr,
    B,
    D,
    stride_o,
    stride_vec,
    stride_dots_chunk,
    K: tl.constexpr,
    DECODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr,
    DOT_ATOMIC: tl.constexpr,
    SCATTER: tl.constexpr,
    EVEN_D: tl.constexpr,
    ALIGN: tl.constexpr,
    STAGES: tl.constexpr,
    UNROLL: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The TopK ops' sparse row work as one pipelined sweep over K (the hierarchical kernel's
    loop, `_step_rows`), on a (BLOCK_B rows, BLOCK_D columns) tile; vals and the row offsets
    (`_step_rows`) step-major (K, B); gW has W's row stride.

    DECODE: out[b] = bias + Σ_i vals[i, b] · W[idx[i, b]] (sparse decode; the encoder's grad_x).
    DOT: dots[i, b] (+)= <vec[b], W[idx[i, b]]> over this chunk, atomically into (K, B) or, for
    determinism, into a (chunks, K, B) partials buffer summed afterwards.
    SCATTER: gW[idx[i, b]] += vals[i, b] · vec[b] (atomics; the segment reduction's alternative).
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = offs_b < B
    offs_b = offs_b.to(tl.int64)
    c = tl.program_id(1)
    offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < D
    m2 = _tile_mask(mb, md, EVEN_D)
    v_steps = vals_ptr + offs_b
    o_steps = off_ptr + offs_b
    w_cols = w_ptr + offs_d[None, :]
    dots_rows = dots_ptr + offs_b
    if DOT and not DOT_ATOMIC:
        dots_rows += c.to(tl.int64) * stride_dots_chunk  # 64-bit: chunks·K·B may pass 2^31
    if DOT or SCATTER:
        vec = tl.load(
            vec_ptr + offs_b[:, None] * stride_vec + offs_d[None, :], mask=m2, other=0.0
        ).to(tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for i in tl.range(0, K, num_stages=STAGES, loop_unroll_factor=UNROLL):
        v, units, e = _step_rows(v_steps, o_steps, w_cols, B, mb, md, i, EVEN_D, ALIGN)
        if DECODE:
            acc += v[:, None] * e
        if DOT:
            dots = tl.sum(vec * e, axis=1)
            step = _step(o_steps, i, B)
            if DOT_ATOMIC:
                tl.atomic_add(dots_rows + step, dots, mask=mb, sem="relaxed")
            else:
                tl.store(dots_rows + step, dots, mask=mb)
        if SCATTER:
            tl.atomic_add(
                gw_ptr + units[:, None] * ALIGN + offs_d[None, :],
                v[:, None] * vec,
                mask=m2,
                sem="relaxed",
            )
    if DECODE:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + offs_b[:, None] * stride_o + offs_d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=m2,
        )


@triton.jit
def hierarchical_kernel(
    loss_part_ptr,
    gv_ptr,
    gr_ptr,
    gw_ptr,
    vals_ptr,
    off_ptr,
    w_ptr,
    bdec_ptr,
    x_ptr,
    B,
    d_start,
    d_end,
    every,
    gw_scale,
    stride_x,
    stride_gv_chunk,
    stride_gr,
    stride_gw_item,
    K: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    GW_MODE: tl.constexpr,
    GV_ATOMIC: tl.constexpr,
    EVEN_D: tl.constexpr,
    ALIGN: tl.constexpr,
    STAGES: tl.constexpr,
    UNROLL: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Hierarchical loss on a (BLOCK_B rows, BLOCK_D columns) tile, plus its gradients.

    With A_i = v_i e_i and r_0 = x − b_dec, the residuals are R_j = r_0 − Σ_{i≤j} A_i. Each
    step of a sweep over i updates the whole tile elementwise (rows are independent, so no scan
    over K is needed): sweep 1 accumulates Σ_{j∈J} ||R_j||² and T = Σ_{j∈J} R_j; sweep 2
    (gradients only) carries S_i = T − Σ_{j<i, j∈J} R_j = Σ_{j≥i, j∈J} R_j, so dL/dv_i ∝
    <S_i, e_i>, dL/de_i ∝ v_i S_i and dL/dr_0 ∝ T = S_1. Sweep 2 re-reads the rows the same
    program just read, from L2. Both sweeps are software-pipelined by Triton (STAGES loop
    iterations of offset -> row loads in flight, UNROLL steps per iteration).
    vals and the row offsets (`_step_rows`) are step-major (K, B) (gW has W's row stride);
    dL/dvals is written step-major too: gv[(chunk,) i, b].
    Unscaled partials are written; the caller applies −2/(B|J|) (gw_scale here, on the scatter).
    GW_MODE 0: no weight grad; 1: atomics into gw[idx]; 2: store v_i S_i to gw[b·K + i] (a
    (B·K, d_end − d_start) buffer later segment-reduced, for determinism).
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = offs_b < B
    offs_b = offs_b.to(tl.int64)
    c = tl.program_id(1)
    chunk = (d_start // BLOCK_D + c).to(tl.int64)  # 64-bit offsets: chunks·K·B may pass 2^31
    offs_d = d_start + c * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < d_end
    m2 = _tile_mask(mb, md, EVEN_D)
    v_steps = vals_ptr + offs_b
    o_steps = off_ptr + offs_b
    w_cols = w_ptr + offs_d[None, :]
    r0 = tl.load(x_ptr + offs_b[:, None] * stride_x + offs_d[None, :], mask=m2, other=0.0).to(
        tl.float32
    )
    r0 -= tl.load(bdec_ptr + offs_d, mask=md, other=0.0).to(tl.float32)[None, :]
    r = r0
    t = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    sq = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for i in tl.range(0, K, num_stages=STAGES, loop_unroll_factor=UNROLL):
        v, _, e = _step_rows(v_steps, o_steps, w_cols, B, mb, md, i, EVEN_D, ALIGN)
        r -= v[:, None] * e
        if _in_j(i, every):
            sq += r * r
            t += r
    tl.store(loss_part_ptr + chunk * B + offs_b, tl.sum(sq, axis=1), mask=mb)
    if WANT_GRAD:
        gv_rows = gv_ptr + offs_b
        if not GV_ATOMIC:
            gv_rows += chunk * stride_gv_chunk
        tl.store(gr_ptr + offs_b[:, None] * stride_gr + offs_d[None, :], t, mask=m2)
        r = r0
        s = t
        for i in tl.range(0, K, num_stages=STAGES, loop_unroll_factor=UNROLL):
            v, units, e = _step_rows(v_steps, o_steps, w_cols, B, mb, md, i, EVEN_D, ALIGN)
            dots = tl.sum(s * e, axis=1)
            step = _step(o_steps, i, B)
            if GV_ATOMIC:
                tl.atomic_add(gv_rows + step, dots, mask=mb, sem="relaxed")
            else:
                tl.store(gv_rows + step, dots, mask=mb)
            if GW_MODE == 1:
                tl.atomic_add(
                    gw_ptr + units[:, None] * ALIGN + offs_d[None, :],
                    (gw_scale * v)[:, None] * s,
                    mask=m2,
                    sem="relaxed",
                )
            if GW_MODE == 2:
                rows = offs_b * K + i
                cols = offs_d - d_start
                tl.store(
                    gw_ptr + rows[:, None] * stride_gw_item + cols[None, :],
                    (gw_scale * v)[:, None] * s,
                    mask=m2,
                )
            r -= v[:, None] * e
            if _in_j(i, every):
                s -= r


@triton.jit
def segment_rows_kernel(
    out_ptr,
    src_ptr,
    coef_ptr,
    order_ptr,
    seg_ptr,
    d_start,
    d_end,
    src_col0,
    row_div,
    stride_src,
    stride_out,
    HAS_COEF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Scatter-add without atomics: out[f] = Σ_{p in segment f} coef[item_p] · src[item_p // row_div].

    Items are the flattened (b, k) pairs sorted (stably) by latent; segment f holds latent f's
    items (every latent has one, empty or not). One program sums one segment's rows for one
    D-chunk, BLOCK_P items at a time, in a fixed order: each output row is written once (no
    zero-fill, no atomics) and results repeat bit for bit.
    Grids run latents fastest so the programs resident together read one (rows, BLOCK_D) slice
    of src, which stays in L2.
    """
    f = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    start = tl.load(seg_ptr + f)
    end = tl.load(seg_ptr + f + 1)
    offs_d = d_start + c * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < d_end
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    p = start
    while p < end:  # a while loop: data-dependent bounds (also what the interpreter accepts)
        offs_p = p + tl.arange(0, BLOCK_P)
        mp = offs_p < end
        item = tl.load(order_ptr + offs_p, mask=mp, other=0).to(tl.int64)
        row = item // row_div
        s = tl.load(
            src_ptr + row[:, None] * stride_src + (offs_d - src_col0)[None, :],
            mask=mp[:, None] & md[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_COEF:
            s *= tl.load(coef_ptr + item, mask=mp, other=0.0).to(tl.float32)[:, None]
        acc += s
        p += BLOCK_P
    tl.store(out_ptr + f * stride_out + offs_d, tl.sum(acc, axis=0), mask=md)


@triton.jit
def scale_inplace_kernel(ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """ptr[:n] *= scale, skipped on the device when scale == 1 (the usual backward of a loss).

    Saves a full read-modify-write of the (F, D) gradient without a host sync on the scale.
    """
    s = tl.load(scale_ptr).to(tl.float32)
    if s != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(ptr + offs, tl.load(ptr + offs, mask=m) * s, mask=m)
