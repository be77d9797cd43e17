"""Adam that also keeps the decoder rows on the unit sphere.

Every step the trainer (1) drops the radial part of each W_dec row's gradient, (2) takes an
Adam step, (3) divides each W_dec row by its norm. On CUDA the three are one Triton pass over
W_dec (sae/kernels/decoder_adam.py) and torch's fused Adam takes the other parameters; on CPU
they run as the three PyTorch steps. The state is plain torch.optim.Adam state (step,
exp_avg, exp_avg_sq per parameter, one group), so checkpoints load either way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class DecoderAdam(torch.optim.Adam):
    """torch.optim.Adam over all parameters; `decoder`'s rows stay unit-norm (see module doc)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        decoder: torch.nn.Parameter,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        fused: bool = False,
        fused_decoder: bool = False,
    ) -> None:
        """`fused`: torch's fused Adam (CUDA); `fused_decoder`: the Triton decoder pass."""
        params = list(params)
        if not any(p is decoder for p in params):
            raise ValueError("the decoder must be one of the optimised parameters")
        super().__init__(params, lr=lr, betas=betas, fused=fused)
        self.decoder = decoder
        self.fused_decoder = fused_decoder

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("DecoderAdam takes no closure")
        w = self.decoder
        if w.grad is None:
            return super().step()
        if not self.fused_decoder:
            g = w.grad
            g -= (g * w).sum(dim=1, keepdim=True) * w
            super().step()
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return None
        from sae.kernels.decoder_adam import decoder_adam_step

        grad, w.grad = w.grad, None
        try:
            super().step()  # every other parameter (a parameter without grad is skipped)
        finally:
            w.grad = grad
        group = self.param_groups[0]
        state = self.state[w]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=w.device)
            state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        state["step"] += 1
        decoder_adam_step(
            w.data,
            grad.contiguous(),
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"],
            group["lr"],
            group["betas"],
            group["eps"],
        )
        return None
