"""One pass per decoder row: drop the gradient's radial part, Adam, renormalise the row.

The trainer keeps every W_dec row on the unit sphere. Done as three PyTorch steps (project the
gradient, torch's fused Adam, divide by the row norms) that is about 16 passes over the (F, D)
fp32 decoder per step; this kernel makes it the 7 that Adam needs anyway (read p, g, m, v; write
p, m, v). One program per row, three loops over its D columns (the row stays in L1/L2 between
them): <g, p>; g' = g − <g, p> p, Adam on g', ||p'||²; p' / ||p'||.

The math is torch.optim.Adam's (no weight decay, no amsgrad), with the step count read from the
device so no host sync is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK = 1024


@triton.jit
def decoder_adam_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    step_ptr,
    lr,
    beta1,
    beta2,
    eps,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Row program_id(0) of the contiguous (F, D) decoder, its gradient and Adam moments."""
    base = tl.program_id(0).to(tl.int64) * D
    t = tl.load(step_ptr).to(tl.float32)  # already incremented for this step
    step_size = lr / (1.0 - tl.exp2(t * tl.log2(beta1)))
    inv_sqrt_c2 = 1.0 / tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2)))
    dot = 0.0
    for c0 in range(0, D, CHUNK):
        offs = base + c0 + tl.arange(0, CHUNK)
        mask = c0 + tl.arange(0, CHUNK) < D
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        dot += tl.sum(g * p, axis=0)
    sq = 0.0
    for c0 in range(0, D, CHUNK):
        offs = base + c0 + tl.arange(0, CHUNK)
        mask = c0 + tl.arange(0, CHUNK) < D
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0) - dot * p
        m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + (1.0 - beta1) * g
        v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_c2 + eps)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(p_ptr + offs, p, mask=mask)
        sq += tl.sum(p * p, axis=0)
    scale = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
    tl.debug_barrier()  # the stores above are read back below by other threads of the program
    for c0 in range(0, D, CHUNK):
        offs = base + c0 + tl.arange(0, CHUNK)
        mask = c0 + tl.arange(0, CHUNK) < D
        tl.store(p_ptr + offs, tl.load(p_ptr + offs, mask=mask, other=0.0) * scale, mask=mask)


def decoder_adam_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """In place on p, m, v (fp32, contiguous, (F, D)); `step` is the already-incremented count."""
    for name, t in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != p.shape:
            raise ValueError(f"decoder Adam needs a contiguous fp32 {tuple(p.shape)} {name}")
    f, d = p.shape
    if f == 0:
        return
    decoder_adam_kernel[(f,)](
        p,
        g,
        m,
        v,
        step,
        float(lr),
        float(betas[0]),
        float(betas[1]),
        float(eps),
        D=d,
        CHUNK=min(_CHUNK, triton.next_power_of_2(d)),
        num_warps=4,
    )


def decoder_adam_reference(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """The same update in PyTorch (any dtype, float64 for tests), in place on p, m, v."""
    b1, b2 = betas
    g = g - (g * p).sum(dim=1, keepdim=True) * p
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.sqrt() / (1 - b2**step) ** 0.5 + eps
    p.sub_(lr / (1 - b1**step) * m / denom)
    p.div_(p.norm(dim=1, keepdim=True).clamp_min(1e-12))
