"""Adam steps for the SAE's parameters, in Triton: the decoder's row pass and a flat one.

Decoder: the trainer keeps every W_dec row on the unit sphere. Done as three PyTorch steps
(project the gradient, torch's fused Adam, divide by the row norms) that is about 16 passes over
the (F, D) fp32 decoder per step; `adam_rows_kernel` makes it the 7 that Adam needs anyway
(read p, g, m, v; write p, m, v). One program per row, three loops over its D columns (the row
stays in L1/L2 between them): <g, p>; g' = g − <g, p> p, Adam on g', ||p'||²; p' / ||p'||.

Flat: the same kernel without the row constraint is plain Adam for the other parameters when the
moments are bf16 (torch's fused Adam keeps them in the parameter's dtype).

Moments may be fp32 or bf16. bf16 moments are stored with stochastic rounding: β2 = 0.999
moves v by 0.1 % per step, below bf16's relative spacing (0.4–0.8 %), so round-to-nearest would
freeze v; rounding up or down with probability proportional to the distance keeps every stored
moment unbiased. The update itself uses the fp32 values before rounding.

The math is torch.optim.Adam's (no weight decay, no amsgrad), with the step count read from the
device so no host sync is needed; the rounding's random stream is seeded from that step count
and a per-parameter salt.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK = 1024
_BLOCK = 2048
STATE_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _stochastic_bf16(x, seed, offs):
    """fp32 -> bf16, rounded up or down at random in proportion to the distance (unbiased)."""
    noise = (tl.randint(seed, offs) & 0xFFFF).to(tl.int32)
    bits = (x.to(tl.int32, bitcast=True) + noise) & -65536  # keep the top 16 bits
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _store_moments(m_ptr, v_ptr, offs, m, v, mask, seed, STATE_BF16: tl.constexpr):
    if STATE_BF16:
        tl.store(m_ptr + offs, _stochastic_bf16(m, seed, offs), mask=mask)
        tl.store(v_ptr + offs, _stochastic_bf16(v, seed + 1, offs), mask=mask)
    else:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _bias_corrections(step_ptr, lr, beta1, beta2, salt):
    """(lr / (1 − β1^t), 1 / sqrt(1 − β2^t), a seed for this step and parameter)."""
    t = tl.load(step_ptr).to(tl.float32)  # already incremented for this step
    step_size = lr / (1.0 - tl.exp2(t * tl.log2(beta1)))
    inv_sqrt_c2 = 1.0 / tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2)))
    seed = t.to(tl.int32) * 4 + salt * 1000003
    return step_size, inv_sqrt_c2, seed


@triton.jit
def _adam(p, g, m_ptr, v_ptr, offs, mask, beta1, beta2, eps, step_size, inv_sqrt_c2):
    """(p', m', v') of one Adam step, moments loaded from any float dtype, all math in fp32."""
    m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta2) * g * g
    return p - step_size * m / (tl.sqrt(v) * inv_sqrt_c2 + eps), m, v


@triton.jit
def adam_rows_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    step_ptr,
    lr,
    beta1,
    beta2,
    eps,
    salt,
    n,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    UNIT_ROWS: tl.constexpr,
    STATE_BF16: tl.constexpr,
):
    """Adam on row program_id(0) (D elements) of a contiguous parameter of n elements.

    UNIT_ROWS (the decoder, one row per program): the gradient's radial part is dropped first
    (<g, p> over the row) and the updated row is divided by its norm after. Without it the rows
    are just BLOCK-sized slices of a flat parameter (D == CHUNK, the last one masked at n).
    """
    base = tl.program_id(0).to(tl.int64) * D
    step_size, inv_sqrt_c2, seed = _bias_corrections(step_ptr, lr, beta1, beta2, salt)
    dot = 0.0
    if UNIT_ROWS:
        for c0 in range(0, D, CHUNK):
            offs = base + c0 + tl.arange(0, CHUNK)
            mask = (c0 + tl.arange(0, CHUNK) < D) & (offs < n)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0)
            p = tl.load(p_ptr + offs, mask=mask, other=0.0)
            dot += tl.sum(g * p, axis=0)
    sq = 0.0
    for c0 in range(0, D, CHUNK):
        offs = base + c0 + tl.arange(0, CHUNK)
        mask = (c0 + tl.arange(0, CHUNK) < D) & (offs < n)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if UNIT_ROWS:
            g -= dot * p
        p, m, v = _adam(p, g, m_ptr, v_ptr, offs, mask, beta1, beta2, eps, step_size, inv_sqrt_c2)
        _store_moments(m_ptr, v_ptr, offs, m, v, mask, seed, STATE_BF16)
        tl.store(p_ptr + offs, p, mask=mask)
        sq += tl.sum(p * p, axis=0)
    if UNIT_ROWS:
        scale = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
        tl.debug_barrier()  # the stores above are read back below by other threads of the program
        for c0 in range(0, D, CHUNK):
            offs = base + c0 + tl.arange(0, CHUNK)
            mask = (c0 + tl.arange(0, CHUNK) < D) & (offs < n)
            tl.store(p_ptr + offs, tl.load(p_ptr + offs, mask=mask, other=0.0) * scale, mask=mask)


def _check(p, g, m, v) -> None:
    for name, t, dtypes in (
        ("param", p, (torch.float32,)),
        ("grad", g, (torch.float32,)),
        ("exp_avg", m, STATE_DTYPES),
        ("exp_avg_sq", v, (m.dtype,)),
    ):
        if t.dtype not in dtypes or not t.is_contiguous() or t.shape != p.shape:
            raise ValueError(
                f"Adam kernels need a contiguous {tuple(p.shape)} {name} "
                f"({' or '.join(str(d) for d in dtypes)}), got {t.dtype} {tuple(t.shape)}"
            )


def _launch(p, g, m, v, step, lr, betas, eps, salt, unit_rows: bool) -> None:
    _check(p, g, m, v)
    n = p.numel()
    if n == 0:
        return
    d = p.shape[1] if unit_rows else _BLOCK
    adam_rows_kernel[(triton.cdiv(n, d),)](
        *(p, g, m, v, step),
        float(lr),
        float(betas[0]),
        float(betas[1]),
        float(eps),
        int(salt),
        n,
        D=d,
        CHUNK=min(_CHUNK, triton.next_power_of_2(d)) if unit_rows else _BLOCK,
        UNIT_ROWS=unit_rows,
        STATE_BF16=m.dtype == torch.bfloat16,
        num_warps=4,
    )


def decoder_adam_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    salt: int = 0,
) -> None:
    """In place on p, m, v ((F, D); fp32 p and g, fp32 or bf16 moments); `step` already counts
    this step. The rows stay unit-norm (see the module docstring)."""
    _launch(p, g, m, v, step, lr, betas, eps, salt, unit_rows=True)


def adam_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    salt: int = 0,
) -> None:
    """Plain Adam in place on p, m, v (any shape, contiguous; moments fp32 or bf16)."""
    _launch(p, g, m, v, step, lr, betas, eps, salt, unit_rows=False)


def stochastic_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PyTorch version of the kernels' rounding (fp32 -> bf16, unbiased), for the CPU path."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32)
    bits = (x.float().contiguous().view(torch.int32) + noise.to(x.device)) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def adam_reference(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    decoder: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' update in PyTorch (any float dtype, float64 for tests), in place on p.

    Returns the new (m, v) before any rounding to the storage dtype; decoder=True adds the
    gradient projection before and the row renormalisation after.
    """
    b1, b2 = betas
    if decoder:
        g = g - (g * p).sum(dim=1, keepdim=True) * p
    m = m.to(p.dtype) * b1 + (1 - b1) * g
    v = v.to(p.dtype) * b2 + (1 - b2) * g * g
    denom = v.sqrt() / (1 - b2**step) ** 0.5 + eps
    p.sub_(lr / (1 - b1**step) * m / denom)
    if decoder:
        p.div_(p.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return m, v
