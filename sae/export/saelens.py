"""SAELens' on-disk format (cfg.json + sae_weights.safetensors), written from our SAE.

Our SAE works in "SAE space": pre = (x·s − b_dec) W_encᵀ + b_enc, x̂ = (b_dec + a W_dec) / s.
SAELens has no input scale, so s is folded in while keeping decoder rows unit-norm:
    b_dec' = b_dec / s,  W_enc' = W_encᵀ,  b_enc' = b_enc / s,  θ' = max(θ, 0) / s,  W_dec' = W_dec.
Then pre' = pre / s, so top-k order, ReLU and the threshold tests pick the same latents, the
latents are ours divided by s, and b_dec' + a' W_dec' = x̂ exactly (in model space).

Mapping: hierarchical/topk → `topk` at the chosen k (default: the training k); BatchTopK →
`jumprelu` with threshold = θ·ones (or `topk` when a k is asked for); JumpReLU → `jumprelu`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sae.atomic import atomic_write, atomic_write_text
from sae.errors import SaeError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"  # optional: key "sparsity", log10 firing frequency
SAELENS_FORMAT_VERSION = "6.0.0"  # the metadata version that selects SAELens' current loader


def saelens_architecture(arch: str, k: int | None) -> str:
    """Which SAELens class an SAE of `arch` becomes (k: an explicit top-k budget)."""
    if arch in ("hierarchical", "topk"):
        return "topk"
    if arch == "batchtopk":
        return "topk" if k is not None else "jumprelu"
    if k is not None:
        raise SaeError("--k applies to top-k SAEs; a JumpReLU SAE exports with its thresholds")
    return "jumprelu"


@torch.no_grad()
def saelens_tensors(sae, architecture: str) -> dict[str, torch.Tensor]:
    """SAELens' state dict (exact names and shapes) with the input scale folded in."""
    s = float(sae.cfg.input_scale)
    tensors = {
        "W_enc": sae.W_enc.detach().float().T.contiguous(),  # (d_in, d_sae)
        "b_enc": (sae.b_enc.detach().float() / s).contiguous(),
        "W_dec": sae.W_dec.detach().float().contiguous(),  # (d_sae, d_in)
        "b_dec": (sae.b_dec.detach().float() / s).contiguous(),
    }
    norms = tensors["W_dec"].norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise SaeError(
            "the SAE's decoder rows are not unit-norm; this file was not written by `sae train`"
        )
    if architecture == "jumprelu":
        tensors["threshold"] = (sae.threshold.detach().float().clamp_min(0) / s).contiguous()
    return {name: t.cpu() for name, t in tensors.items()}


def saelens_config(sae, architecture: str, k: int | None, *, dataset: str = "") -> dict:
    """cfg.json: every key SAELens' loader reads for `topk` / `jumprelu`."""
    from sae import __version__

    cfg = sae.cfg
    layer = cfg.layer
    hook = f"blocks.{layer}.hook_resid_post" if layer >= 0 else (cfg.hook or "")
    out: dict = {
        "architecture": architecture,
        "d_in": cfg.d_model,
        "d_sae": cfg.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the input scale is folded into the weights
        "reshape_activations": "none",
    }
    if architecture == "topk":
        out["k"] = int(k if k is not None else cfg.k)
        out["rescale_acts_by_decoder_norm"] = False
    out["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": f"sae {__version__} ({cfg.arch}, k={cfg.k})",
        "model_name": cfg.model or None,
        "model_class_name": "HookedTransformer",
        "hook_name": hook,
        "hook_head_index": None,
        "context_size": cfg.context or None,
        "prepend_bos": True,
        "seqpos_slice": [None],
        "dataset_path": dataset or None,
        "model_from_pretrained_kwargs": {"center_writing_weights": False},
        "exclude_special_tokens": False,
        "neuronpedia_id": None,
    }
    return out


def saelens_setting(sae, architecture: str, k: int | None) -> str:
    """The `sae eval` setting label whose firing frequencies match an export."""
    return f"top-{k if k is not None else sae.cfg.k}" if architecture == "topk" else "threshold"


def write_saelens(
    sae,
    out: str | Path,
    *,
    k: int | None = None,
    dataset: str = "",
    frequency: torch.Tensor | None = None,
) -> Path:
    """Write `out/cfg.json`, `out/sae_weights.safetensors` and, given the exported setting's
    firing frequencies, `out/sparsity.safetensors` (log10(frequency + 1e-10), as SAELens logs
    it); returns the folder. Without frequencies a sparsity file left in `out` is removed."""
    from safetensors.torch import save_file

    architecture = saelens_architecture(sae.cfg.arch, k)
    if k is not None and not 1 <= k <= sae.cfg.n_latents:
        raise SaeError(f"--k must be between 1 and {sae.cfg.n_latents}, got {k}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = saelens_tensors(sae, architecture)
    config = saelens_config(sae, architecture, k, dataset=dataset)
    metadata = {"format": "pt"}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write_text(folder / CFG_FILE, json.dumps(config, indent=2) + "\n")
    if frequency is None:
        (folder / SPARSITY_FILE).unlink(missing_ok=True)  # would describe another SAE
    else:
        sparsity = {"sparsity": torch.log10(frequency.detach().float().cpu() + 1e-10).contiguous()}
        atomic_write(
            folder / SPARSITY_FILE, lambda tmp: save_file(sparsity, str(tmp), metadata=metadata)
        )
    return folder
