"""Resumable checkpoints: one file, written to a temporary name and renamed into place.

The file holds only tensors and JSON-like values so it loads with torch.load(weights_only=True).
A killed run restarts from the last complete checkpoint: same weights, optimiser moments, reader
positions (one per rank), RNG states, step and dead-latent counters.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from sae.atomic import tmp_path
from sae.errors import SaeError

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"


def checkpoint_path(out: Path) -> Path:
    return out / CHECKPOINT_DIR / CHECKPOINT_FILE


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA if present, Python's random)."""
    state: dict = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, payload: dict) -> None:
    """Atomically replace the run's checkpoint with `payload`."""
    path = checkpoint_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(out: Path) -> dict:
    """The run's last checkpoint; SaeError if there is none or it cannot be read."""
    path = checkpoint_path(out)
    if not path.is_file():
        raise SaeError(
            f"--resume: {out} has no checkpoint yet ({path} is missing); "
            "start the run over with --overwrite instead of --resume"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say so instead of a traceback
        raise SaeError(f"cannot read checkpoint {path}: {err}") from None
