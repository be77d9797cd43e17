"""Our own format: config.json (SAEConfig) + sae.safetensors, read back by `sae.load(path)`."""

from __future__ import annotations

import copy
from pathlib import Path

from sae.errors import SaeError


def write_native(sae, out: str | Path, *, k: int | None = None) -> Path:
    """Save the SAE as a standalone folder; `k` changes the default inference budget."""
    if k is not None:
        if sae.cfg.arch == "jumprelu":
            raise SaeError("--k applies to top-k SAEs; a JumpReLU SAE has no k")
        if not 1 <= k <= sae.cfg.n_latents:
            raise SaeError(f"--k must be between 1 and {sae.cfg.n_latents}, got {k}")
        sae = copy.deepcopy(sae)
        sae.cfg.k = int(k)
    from sae.eval.frequency import FREQUENCY_FILE
    from sae.eval.pipeline import EVAL_FILE

    for name in (EVAL_FILE, FREQUENCY_FILE):  # results of an SAE this one replaces (--overwrite)
        (Path(out) / name).unlink(missing_ok=True)
    sae.save(out)
    return Path(out)
