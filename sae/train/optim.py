"""Adam that also keeps the decoder rows on the unit sphere, with fp32 or bf16 moments.

Every step the trainer (1) drops the radial part of each W_dec row's gradient, (2) takes an
Adam step, (3) divides each W_dec row by its norm. On CUDA the three are one Triton pass over
W_dec (sae/kernels/decoder_adam.py) and torch's fused Adam takes the other parameters; on CPU
they run as the three PyTorch steps. The state is plain torch.optim.Adam state (step,
exp_avg, exp_avg_sq per parameter, one group), so checkpoints load either way. The decoder's
three steps live in one place per device: the Triton kernel, or `adam_reference` on CPU.

`state_dtype=torch.bfloat16` (`sae train --adam-state bfloat16`) stores both moments in bf16
with stochastic rounding: half the optimiser memory and about 0.6-0.7 ms less per step at
Gemma-2-2B shape on an H100 (docs/benchmarks.md). Every parameter then goes through our own
update (Triton on CUDA, PyTorch on CPU), since torch's Adam keeps moments in the parameter's
dtype. Loading a checkpoint casts the moments to this optimiser's dtype, so the option may
change when a run resumes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sae.kernels.decoder_adam import (
    STATE_DTYPES,
    adam_reference,
    adam_step,
    decoder_adam_step,
    stochastic_bf16,
)


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
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`fused`: torch's fused Adam (CUDA); `fused_decoder`: the Triton passes (CUDA)."""
        params = list(params)
        if not any(p is decoder for p in params):
            raise ValueError("the decoder must be one of the optimised parameters")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"Adam moments must be float32 or bfloat16, got {state_dtype}")
        super().__init__(params, lr=lr, betas=betas, fused=fused)
        self.decoder = decoder
        self.fused_decoder = fused_decoder
        self.state_dtype = state_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # torch casts moments to the parameters' dtype
        if self.state_dtype != torch.float32:
            for state in self.state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = state[key].to(self.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("DecoderAdam takes no closure")
        if self.state_dtype != torch.float32:
            self._step_own()
            return None
        w = self.decoder
        if w.grad is None:
            return super().step()
        grad, w.grad = w.grad, None
        try:
            super().step()  # every other parameter (a parameter without grad is skipped)
        finally:
            w.grad = grad
        self._update(w, 0, self.param_groups[0])
        return None

    def _state(self, p: torch.nn.Parameter) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
        return state

    def _step_own(self) -> None:
        """Every parameter by our own update (bf16 moments)."""
        salt = 0
        for group in self.param_groups:
            for p in group["params"]:
                salt += 1
                if p.grad is not None:
                    self._update(p, salt, group)

    def _update(self, p: torch.nn.Parameter, salt: int, group: dict) -> None:
        state = self._state(p)
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        args = (group["lr"], group["betas"], group["eps"])
        decoder = p is self.decoder
        if self.fused_decoder:
            step_fn = decoder_adam_step if decoder else adam_step
            step_fn(p.data, p.grad.contiguous(), m, v, state["step"], *args, salt=salt)
            return
        m_new, v_new = adam_reference(p.data, p.grad, m, v, float(state["step"]), *args, decoder)
        if m.dtype == torch.bfloat16:
            # Noise seeded by step and parameter, as in the kernels: torchrun ranks seed the
            # global RNG differently, and rounding their moments apart would drift the weights.
            gen = torch.Generator().manual_seed(int(state["step"]) * 4 + salt * 1000003)
            m_new, v_new = stochastic_bf16(m_new, gen), stochastic_bf16(v_new, gen)
        m.copy_(m_new)
        v.copy_(v_new)
