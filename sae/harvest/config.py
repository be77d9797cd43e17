"""The harvest's settings: one dataclass the CLI fills and the cache records (JSON) in its attrs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_MODEL = "google/gemma-2-2b"
DEFAULT_DATASET = "HuggingFaceFW/fineweb"
DEFAULT_DATASET_CONFIG = "sample-10BT"


@dataclass
class HarvestConfig:
    """Everything that decides what a harvest writes (``identity``) and how it runs."""

    model: str = DEFAULT_MODEL
    layer: int = 12
    tokens: int = 10**9
    out: str = "store"
    dataset: str = DEFAULT_DATASET
    dataset_config: str | None = DEFAULT_DATASET_CONFIG
    split: str = "train"
    text_column: str = "text"
    context: int = 1024
    batch_size: int = 8  # windows per forward pass
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"
    revision: str | None = None
    seed: int = 0  # the harvest is deterministic (dataset order); kept for the cache identity
    overwrite: bool = False
    chunk_rows: int | None = None  # store layout; None = the store's defaults
    shard_rows: int | None = None
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self, *, d_model: int, dtype: str, hook: str, tokenizer: str) -> dict[str, Any]:
        """What must match for a re-run to continue an existing cache instead of starting over."""
        return {
            "model": self.model,
            "model_revision": self.revision,
            "layer": self.layer,
            "hook": hook,
            "d_model": d_model,
            "dtype": dtype,
            "context": self.context,
            "tokenizer": tokenizer,
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "split": self.split,
            "text_column": self.text_column,
            "seed": self.seed,
        }
