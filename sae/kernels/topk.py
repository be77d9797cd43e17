"""Exact row-wise top-k over many columns: a group-maximum threshold, then a small sort.

torch.topk over the encoder's (8192, 65536) bf16 pre-activations costs ~3.9 ms on an H100 (a
radix select with eight counting passes). Most columns cannot be in a row's top k, and one pass
proves it: split the row into groups of G columns and take each group's maximum. The k-th
largest group maximum τ is a lower bound on the row's k-th largest value (the k groups with the
largest maxima hold k distinct elements ≥ τ), so the row's top k is the top k of the few
elements ≥ τ (about 1.1·k with the default 8k groups). One program per row:

  pass 1: group maxima (as order-preserving int32 keys, with their group ids) -> scratch; sort
          them; τ = the k-th.
  pass 2: in the k groups with the largest maxima only (an eighth of the row), every element
          with key ≥ τ goes into a (CAP,) candidate buffer as key<<32 | column.
  rare:   more than CAP candidates (heavy ties): bisect the key space for the exact k-th key
          (one counting pass per step), then keep the keys above it and ties up to k in all.
  last:   sort the buffer, write the first k (values exactly as stored, columns as int64).

Values equal torch.topk's exactly; ties at the k-th value may pick other, equal-valued columns
(torch.topk promises nothing there either). NaNs rank above +inf, as in torch.topk, and come
out as the canonical (positive) NaN.

Knobs (benchmarks, read at call time): SAE_KERNELS_TOPK = select (default) | torch;
SAE_KERNELS_TOPK_TILE = "chunk,groups per k,warps" (default "1024,8,4", fewer groups per k
above k = 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae.kernels import knobs

TOPK_ENV = "SAE_KERNELS_TOPK"
TOPK_CHOICES = ("select", "torch")
TILE_ENV = "SAE_KERNELS_TOPK_TILE"
# elements per load in the row passes, groups per k (more: fewer candidates, more to sort), warps
_TILE = (1024, 8, 4)
# Groups per k shrink for large k so that about this many group maxima get sorted: at k = 512
# (BatchTopK's candidates) 8 groups per k meant sorting 4096 maxima, 3.26 ms on an H200 vs 1.16
# with 2 per k (torch.topk: 2.06); about 700 candidates are then expected, under CAP = 1024.
_SORTED_GROUPS = 1024
_MAX_GROUPS = 4096  # group maxima sorted in registers
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _order_key(x):
    """float32 -> int32 whose signed order is the float order (a bit trick; an involution)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_key(key):
    """The inverse of _order_key, back to float32."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _row_keys(xrow, cols, N):
    valid = cols < N
    x = tl.load(xrow + cols, mask=valid, other=float("-inf")).to(tl.float32)
    # Every NaN, whatever its sign bit, ranks above +inf, as in torch.topk (a NaN with the sign
    # bit set would otherwise get the smallest key).
    x = tl.where(x != x, float("nan"), x)
    # Columns past N get the smallest key, which no value has (NaNs are positive here): below
    # -inf's, so a padding group never ties with a group of -infs for pass 2's K groups.
    return tl.where(valid, _order_key(x), -2147483648), valid


@triton.jit
def _count_at_least(xrow, t, N: tl.constexpr, CHUNK: tl.constexpr):
    n = 0
    for c0 in range(0, N, CHUNK):
        key, valid = _row_keys(xrow, c0 + tl.arange(0, CHUNK), N)
        n += tl.sum(((key.to(tl.int64) >= t) & valid).to(tl.int32), axis=0)
    return n


@triton.jit
def row_topk_kernel(
    vals_ptr,
    idx_ptr,
    x_ptr,
    gmax_ptr,
    buf_ptr,
    cnt_ptr,
    stride_x,
    stride_v,
    stride_i,
    K,
    N: tl.constexpr,
    G: tl.constexpr,
    NG_PAD: tl.constexpr,
    CAP: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Top K of row program_id(0) of x (B, N) into vals/idx (B, K); see the module docstring.

    N is a compile-time constant (one compile per model width; the row loops get static
    bounds); K is not, so an eval sweeping k compiles once per (G, CAP) bucket, not per k.
    Scratch per row: gmax (NG_PAD,) int64, buf (CAP,) int64, cnt (4,) int32 zeroed here.
    """
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + row * stride_x
    buf = buf_ptr + row * CAP
    slots = tl.arange(0, CAP)
    empty = tl.full([CAP], -9223372036854775808, tl.int64)  # sorts below every candidate
    tl.store(buf + slots, empty)
    cnt = cnt_ptr + row * 4
    tl.store(cnt + tl.arange(0, 4), tl.zeros([4], tl.int32))

    # pass 1: each group's maximum key, packed with the group's id; τ = the K-th largest key
    GPC: tl.constexpr = CHUNK // G
    offs_g = tl.arange(0, GPC)
    gmax_row = gmax_ptr + row * NG_PAD
    for g0 in range(0, NG_PAD, GPC):
        cols = (g0 + offs_g)[:, None] * G + tl.arange(0, G)[None, :]
        key, _valid = _row_keys(xrow, cols, N)
        best = tl.max(key, axis=1).to(tl.int64)
        tl.store(gmax_row + g0 + offs_g, (best << 32) | (g0 + offs_g).to(tl.int64))
    tl.debug_barrier()
    ranks = tl.arange(0, NG_PAD)
    groups = tl.sort(tl.load(gmax_row + ranks), descending=True)
    tau = tl.sum(tl.where(ranks == K - 1, groups, 0), axis=0) >> 32
    tl.debug_barrier()
    tl.store(gmax_row + ranks, groups)  # the groups by maximum, for pass 2
    tl.debug_barrier()

    # pass 2: candidates ≥ τ. Only the K groups with the largest maxima can hold them (every
    # element above τ is in a group whose maximum beats τ, and these K groups alone already hold
    # K elements ≥ τ), so this reads about a quarter of the row. Slots come from an atomic
    # counter; the final sort orders them.
    total = 0
    j0 = 0
    while j0 < K:
        jj = j0 + offs_g
        top = jj < K
        gid = tl.load(gmax_row + jj, mask=top, other=0)
        gid = gid - ((gid >> 32) << 32)
        cols = gid[:, None] * G + tl.arange(0, G)[None, :]
        key, valid = _row_keys(xrow, cols, N)
        key64 = key.to(tl.int64)
        hit = (key64 >= tau) & valid & top[:, None]
        pos = tl.atomic_add(cnt + tl.zeros([GPC, G], tl.int32), 1, mask=hit, sem="relaxed")
        tl.store(buf + pos, (key64 << 32) | cols, mask=hit & (pos < CAP))
        total += tl.sum(tl.sum(hit.to(tl.int32), axis=1), axis=0)
        j0 += GPC

    if total > CAP:
        # Heavy ties: find the exact K-th largest key lo (count(≥ lo) ≥ K > count(≥ hi)).
        lo = tau
        hi = (tl.max(groups, axis=0) >> 32) + 1
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            enough = _count_at_least(xrow, mid, N, CHUNK) >= K
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        tl.debug_barrier()
        tl.store(buf + slots, empty)
        tl.debug_barrier()
        # keys above lo (fewer than K) into slots [0, K); ties at lo into [K, 2K), K at most
        for c0 in range(0, N, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            key, valid = _row_keys(xrow, cols, N)
            key64 = key.to(tl.int64)
            packed = (key64 << 32) | cols.to(tl.int64)
            above = (key64 > lo) & valid
            tie = (key64 == lo) & valid
            zeros = tl.zeros([CHUNK], tl.int32)
            p_above = tl.atomic_add(cnt + 1 + zeros, 1, mask=above, sem="relaxed")
            tl.store(buf + p_above, packed, mask=above)
            p_tie = tl.atomic_add(cnt + 2 + zeros, 1, mask=tie, sem="relaxed")
            tl.store(buf + K + p_tie, packed, mask=tie & (p_tie < K))

    tl.debug_barrier()
    best = tl.sort(tl.load(buf + slots), descending=True)
    key = (best >> 32).to(tl.int32)
    col = best - ((best >> 32) << 32)
    val = _from_key(key)
    keep = slots < K
    tl.store(vals_ptr + row * stride_v + slots, val.to(vals_ptr.dtype.element_ty), mask=keep)
    tl.store(idx_ptr + row * stride_i + slots, col, mask=keep)


def topk_method() -> str:
    """SAE_KERNELS_TOPK: "select" (the kernel, default) or "torch" (torch.topk)."""
    return knobs.choice(TOPK_ENV, TOPK_CHOICES)


def _geometry(n: int, k: int, chunk: int, per_k: int) -> tuple[int, int, int] | None:
    """(G, NG_PAD, CAP) for rows of n columns, or None where the kernel does not apply."""
    if k < 1 or n < per_k * k:
        return None
    g = min(1 << ((n // (per_k * k)).bit_length() - 1), chunk)  # about per_k·k groups
    ng_pad = triton.next_power_of_2(triton.cdiv(n, g))
    if ng_pad > _MAX_GROUPS:
        return None
    return g, max(ng_pad, chunk // g), max(16, triton.next_power_of_2(2 * k))


def row_topk(
    x: torch.Tensor, k: int, method: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values sorted descending, int64 column indices) of each row's k largest entries.

    The contract of `x.topk(k, dim=1, sorted=True)` for a 2-D x (which it falls back to for
    shapes and dtypes the kernel does not cover). Runs on CUDA, or on CPU under TRITON_INTERPRET.
    """
    chunk, per_k, warps = _TILE
    per_k = min(per_k, max(2, _SORTED_GROUPS // max(k, 1)))
    # the chunk is a block (a power of two), groups per k a count
    chunk, per_k, warps = knobs.tile(TILE_ENV, (chunk, per_k, warps), pow2=(True, False))
    ok = x.dim() == 2 and x.dtype in _DTYPES
    geom = _geometry(x.shape[1], k, chunk, per_k) if ok else None
    if (method or topk_method()) == "torch" or geom is None or x.shape[0] == 0:
        return x.topk(k, dim=1, sorted=True)
    g, ng_pad, cap = geom
    if x.stride(1) != 1:
        x = x.contiguous()
    b, n = x.shape
    vals = torch.empty((b, k), dtype=x.dtype, device=x.device)
    idx = torch.empty((b, k), dtype=torch.int64, device=x.device)
    gmax = torch.empty((b, ng_pad), dtype=torch.int64, device=x.device)
    buf = torch.empty((b, cap), dtype=torch.int64, device=x.device)
    cnt = torch.empty((b, 4), dtype=torch.int32, device=x.device)
    row_topk_kernel[(b,)](
        vals,
        idx,
        x,
        gmax,
        buf,
        cnt,
        x.stride(0),
        vals.stride(0),
        idx.stride(0),
        k,
        N=n,
        G=g,
        NG_PAD=ng_pad,
        CAP=cap,
        CHUNK=chunk,
        num_warps=warps,
    )
    return vals, idx
