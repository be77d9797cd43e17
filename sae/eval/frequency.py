"""Per-latent firing frequencies that `sae eval` records next to eval.json, for exports.

One float32 (F,) tensor per inference setting ("top-8", "threshold", ...), so an export picks
the one that matches the setting it writes (SAELens' optional sparsity.safetensors holds
log10 firing frequencies). Files are safetensors (no pickle); a file read back is checked as
untrusted input: right names, shapes and values in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae.atomic import atomic_write
from sae.errors import SaeError

FREQUENCY_FILE = "latent_frequency.safetensors"


def frequency_path(eval_json: Path, default: bool) -> Path:
    """Where the frequencies of an eval written to `eval_json` go: the run's own file for its
    default eval.json, else one named after the JSON (results/a.json -> results/a.FREQUENCY_FILE)."""
    name = FREQUENCY_FILE if default else f"{eval_json.stem}.{FREQUENCY_FILE}"
    return eval_json.with_name(name)


def write_frequencies(freqs: dict[str, torch.Tensor], path: str | Path, *, tokens: int) -> Path:
    """Write {setting label: (F,) frequency} atomically (a reader never sees half a file)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {label: f.detach().float().cpu().contiguous() for label, f in freqs.items()}
    metadata = {"tokens": str(int(tokens))}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_frequency(path: str | Path, label: str, n_latents: int) -> tuple[torch.Tensor, int] | None:
    """(frequency (F,) float32, rows it was measured on) of setting `label`, or None when the
    file has no such setting. A file that is not what `sae eval` writes stops with a message."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    redo = f"delete it or rerun `sae eval` on {path.parent}"
    try:
        with safe_open(str(path), framework="pt") as f:
            labels = f.keys()
            if label not in labels:
                return None
            freq = f.get_tensor(label)
            tokens = (f.metadata() or {}).get("tokens", "")
    except (OSError, SafetensorError) as err:
        raise SaeError(f"cannot read {path} ({err}); {redo}") from None
    if freq.shape != (n_latents,) or not freq.is_floating_point():
        raise SaeError(
            f"{path}: {label} is {tuple(freq.shape)} {freq.dtype}, not ({n_latents},) float "
            f"frequencies of this SAE; {redo}"
        )
    freq = freq.float()
    if not bool(((freq >= 0) & (freq <= 1)).all()):
        raise SaeError(f"{path}: {label} holds values outside [0, 1]; {redo}")
    if not tokens.isdigit() or int(tokens) <= 0:
        raise SaeError(f"{path} does not record how many rows were evaluated; {redo}")
    return freq, int(tokens)
