"""sae: harvest a language model's activations into a Zarr v3 cache and train sparse autoencoders on it.

Data flows one way: text -> tokens -> activations -> store -> batches -> SAE -> metrics.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["SaeError", "__version__", "load"]

from sae.errors import SaeError


def load(path: str, device: str = "cpu") -> Any:
    """Load a trained SAE (a run directory or an exported `sae` folder)."""
    from sae.train.model import load_sae

    return load_sae(path, device=device)
