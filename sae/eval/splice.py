"""Downstream fidelity: splice the SAE's reconstruction into the language model at its layer.

A forward hook on decoder block `layer` replaces the block's output (the residual stream after
block L, i.e. hidden_states[L + 1], the site the cache was harvested at) with the SAE's
reconstruction, and the rest of the model runs on it. Reported per inference setting, over the
next-token predictions of the given windows:
- CE increase = CE(spliced) − CE(clean), in nats per predicted token;
- KL = mean over predicted positions of KL(p_clean ‖ p_spliced), in nats;
- CE recovered = (CE(zero) − CE(spliced)) / (CE(zero) − CE(clean)), with CE(zero) the model
  with that residual stream zeroed (SAELens' "CE loss score"; 1 = as good as the clean model).
Position 0 of every window is left clean, as the cache leaves those rows out of training (the
window's BOS or first token: its norm is far outside the distribution; SAELens/SAEBench also keep
BOS clean). A BOS or separator later in a window is spliced: the SAE was trained on such rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sae.eval.evaluate import Setting


@dataclass
class SpliceTotals:
    """float64 running sums for one setting."""

    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0
    predictions: int = 0
    active: int = 0
    spliced_rows: int = 0

    def summary(self, setting: Setting) -> dict:
        n = max(self.predictions, 1)
        gap = self.ce_zero - self.ce_clean
        return {
            "mode": setting.mode,
            "k": setting.k,
            "l0": self.active / max(self.spliced_rows, 1),
            "ce_clean": self.ce_clean / n,
            "ce_spliced": self.ce_spliced / n,
            "ce_increase": (self.ce_spliced - self.ce_clean) / n,
            "kl": self.kl / n,
            "ce_zero_ablation": self.ce_zero / n,
            "ce_recovered": (self.ce_zero - self.ce_spliced) / gap if gap > 0 else None,
            "predictions": self.predictions,
            "spliced_rows": self.spliced_rows,
        }


class SpliceHook:
    """Forward hook that swaps a block's hidden-state output for the SAE reconstruction."""

    def __init__(self, sae, setting: Setting, keep: torch.Tensor, totals: SpliceTotals) -> None:
        self.sae, self.setting, self.keep, self.totals = sae, setting, keep, totals

    def __call__(self, _module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple | list) else output
        flat = hidden.reshape(-1, hidden.shape[-1])
        sae = self.sae
        x = flat.to(sae.W_dec.device, torch.float32)
        if self.setting.mode == "zero":
            recon = torch.zeros_like(x)
            active = torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)
        elif self.setting.mode == "topk":
            vals, idx = sae.encode(x, self.setting.k, mode="topk")
            recon = sae.decode(vals, idx) / sae.cfg.input_scale
            active = vals > 0
        else:
            latents = sae.encode_dense(x, mode="threshold")
            recon = sae.decode_dense(latents) / sae.cfg.input_scale
            active = latents > 0
        keep = self.keep.reshape(-1, 1).to(recon.device)
        spliced_rows = ~keep.squeeze(1)
        self.totals.active += int(active[spliced_rows].sum())
        self.totals.spliced_rows += int(spliced_rows.sum())
        recon = torch.where(keep, x, recon)
        new = recon.to(hidden.dtype).to(hidden.device).reshape(hidden.shape)
        if isinstance(output, tuple | list):
            return type(output)((new, *output[1:]))
        return new


def _log_probs(lm, ids: torch.Tensor) -> torch.Tensor:
    """(b, T-1, V) float32 log-probabilities of the next token at every position but the last."""
    logits = lm(input_ids=ids, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _spliced_ce(lm, block, sae, ids, keep, targets) -> float:
    """Summed next-token CE with the block's output zeroed (the zero-ablation baseline)."""
    handle = block.register_forward_hook(SpliceHook(sae, Setting("zero"), keep, SpliceTotals()))
    try:
        logp = _log_probs(lm, ids)
    finally:
        handle.remove()
    return float(-logp.gather(-1, targets.unsqueeze(-1)).double().sum())


@torch.inference_mode()
def splice_eval(
    lm,
    block: torch.nn.Module,
    sae,
    windows: Iterable[torch.Tensor],
    settings: list[Setting],
) -> list[dict]:
    """CE increase and KL of `lm` with `block`'s output replaced, for each setting.

    windows: (b, T) token-id batches on the model's device (equal-length rows within a batch).
    """
    totals = {s.label: SpliceTotals() for s in settings}
    for ids in windows:
        if ids.shape[1] < 2:
            continue
        targets = ids[:, 1:]
        clean = _log_probs(lm, ids)
        ce_clean = float(-clean.gather(-1, targets.unsqueeze(-1)).double().sum())
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[:, 0] = True  # the rows the cache drops (position 0), whatever token they hold
        ce_zero = _spliced_ce(lm, block, sae, ids, keep, targets)
        p_clean = clean.exp()
        for setting in settings:
            total = totals[setting.label]
            handle = block.register_forward_hook(SpliceHook(sae, setting, keep, total))
            try:
                spliced = _log_probs(lm, ids)
            finally:
                handle.remove()
            total.ce_clean += ce_clean
            total.ce_zero += ce_zero
            total.ce_spliced += float(-spliced.gather(-1, targets.unsqueeze(-1)).double().sum())
            total.kl += float((p_clean * (clean - spliced)).sum(-1).double().sum())
            total.predictions += targets.numel()
    return [totals[s.label].summary(s) for s in settings]
