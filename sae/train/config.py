"""TrainConfig: everything `sae train` was asked to do, saved as RUN/config.json.

The JSON is flat and holds every SAEConfig field under the same name, so `load_sae(RUN)` reads
the SAE straight from a run directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sae.errors import SaeError
from sae.train.model import ARCHS, SAEConfig

TOPK_FAMILY = ("hierarchical", "topk", "batchtopk")
B_DEC_INITS = ("median", "mean")
ENCODER_DTYPES = ("bfloat16", "float32")
ADAM_STATES = ("float32", "bfloat16")

# The sparse kernels' per-row K limit (sae.kernels.triton_ops.MAX_K; not imported: no triton here)
MAX_SPARSE_K = 1024
# Fields that must not change when a run is resumed (the rest may, e.g. --tokens to extend).
RESUME_FIXED = (
    "d_model",
    "n_latents",
    "k",
    "arch",
    "loss_every",
    "batch",
    "seed",
    "lr",
    "warmup_steps",
    "decay_fraction",
    "dead_tokens",
    "aux_k",
    "aux_coef",
    "l0_coef",
    "jumprelu_bandwidth",
    "world_size",
)


@dataclass
class TrainConfig:
    """`sae train` options (as given) plus what was resolved from the cache (d_model, scale...)."""

    cache: str
    out: str
    k: int = 128
    arch: str = "hierarchical"
    n_latents: int | None = None  # --latents; None: expansion * d_model, or 65536
    expansion: int | None = None
    loss_every: int = 1
    lr: float = 8e-4
    warmup_steps: int = 0
    decay_fraction: float = 0.0  # lr decays linearly to 0 over this last fraction of steps
    batch: int = 4096  # global batch (all ranks together)
    tokens: int | None = None  # None: the cache's train split once
    seed: int = 0
    device: str = "auto"
    dead_tokens: int = 10_000_000
    aux_k: int = 512
    aux_coef: float = 1 / 32
    l0_coef: float = 1e-3  # jumprelu
    jumprelu_bandwidth: float = 1e-3
    jumprelu_init_threshold: float = 1e-3
    theta_momentum: float = 0.99  # batchtopk θ: exponential running mean
    b_dec_init: str = "median"
    init_tokens: int = 16384
    eval_every: int = 500  # steps; 0: only at the end
    eval_tokens: int = 65536
    log_every: int = 50
    checkpoint_every: int = 2000  # ~3.6 GB each at 65536 x 2304: keep the write rare
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    deterministic: bool = False  # bitwise-repeatable GPU kernels (sorted reductions, slower)
    encoder_dtype: str = "bfloat16"  # encoder matmul on CUDA: bfloat16 (autocast) | float32
    adam_state: str = "float32"  # Adam moments: float32 | bfloat16 (stochastic rounding)
    # Cache reader threads: one keeps an H100 step fed from a warm cache (93-95 % of the
    # GPU-resident rate at 2304 x 65,536, K=128, in two runs; 2 threads 88-92 %, 8 threads 83-86 %:
    # the reader's threads take CPU from the thread launching the kernels). Cold or remote
    # caches may want more.
    read_workers: int = 1
    # Resolved from the cache / run (not options):
    d_model: int = 0
    input_scale: float = 1.0
    steps: int = 0
    world_size: int = 1
    model: str = ""
    layer: int = -1
    hook: str = ""
    cache_url: str = ""
    context: int = 0

    def validate_options(self) -> None:
        """Check what the user typed, before any data is read."""
        for flag, value, choices in (
            ("--arch", self.arch, ARCHS),
            ("--encoder-dtype", self.encoder_dtype, ENCODER_DTYPES),
            ("--adam-state", self.adam_state, ADAM_STATES),
            ("--b-dec-init", self.b_dec_init, B_DEC_INITS),
        ):
            if value not in choices:
                raise SaeError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        if self.n_latents is not None and self.expansion is not None:
            raise SaeError("pass either --latents or --expansion, not both")
        positive = {
            "--k": self.k,
            "--loss-every": self.loss_every,
            "--batch": self.batch,
            "--aux-k": self.aux_k,
            "--init-tokens": self.init_tokens,
            "--eval-tokens": self.eval_tokens,
            "--log-every": self.log_every,
            "--checkpoint-every": self.checkpoint_every,
            "--read-workers": self.read_workers,
        }
        if self.arch == "jumprelu":
            positive.pop("--k")
        for name, value in positive.items():
            if value < 1:
                raise SaeError(f"{name} must be >= 1, got {value}")
        for name, value in {"--latents": self.n_latents, "--expansion": self.expansion}.items():
            if value is not None and value < 1:
                raise SaeError(f"{name} must be >= 1, got {value}")
        if not self.lr > 0:
            raise SaeError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise SaeError(f"--decay must be a fraction in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.dead_tokens < 1:
            raise SaeError("--warmup, --eval-every must be >= 0 and --dead-tokens >= 1")
        # `not (... >= 0)` so NaN fails too (it compares false either way); inf is no setting
        for name, value, least in (
            ("--l0-coef", self.l0_coef, 0.0),
            ("--aux-coef", self.aux_coef, 0.0),
            ("--bandwidth", self.jumprelu_bandwidth, None),
            ("jumprelu_init_threshold", self.jumprelu_init_threshold, 0.0),
        ):
            ok = value >= least if least is not None else value > 0
            if not (ok and math.isfinite(value)):
                bound = f">= {least:g}" if least is not None else "> 0"
                raise SaeError(f"{name} must be a finite number {bound}, got {value}")
        if not 0 <= self.theta_momentum < 1:
            raise SaeError(f"theta_momentum must be in [0, 1), got {self.theta_momentum}")
        # per-row widths the sparse kernels take (BatchTopK cuts its rows into pieces instead);
        # refused on the CPU too, so a run that works here also works on the GPU
        widths = {"--aux-k": self.aux_k if self.arch in TOPK_FAMILY else 0}
        widths["--k"] = self.k if self.arch in ("hierarchical", "topk") else 0
        for name, value in widths.items():
            if value > MAX_SPARSE_K:
                raise SaeError(
                    f"{name} {value} is more than the sparse kernels take per token "
                    f"({MAX_SPARSE_K}); lower it"
                )

    def ignored_options(self) -> list[str]:
        """Options set away from their defaults that this arch does not use (said, not refused:
        a sweep may pass one set of flags to every arch)."""
        default = TrainConfig(cache="", out="")
        unused = {
            "--loss-every": ("loss_every", self.arch != "hierarchical"),
            "--l0-coef": ("l0_coef", self.arch != "jumprelu"),
            "--bandwidth": ("jumprelu_bandwidth", self.arch != "jumprelu"),
            "--aux-k": ("aux_k", self.arch not in TOPK_FAMILY),
            "--aux-coef": ("aux_coef", self.arch not in TOPK_FAMILY),
        }
        return [
            flag
            for flag, (name, unused_here) in unused.items()
            if unused_here and getattr(self, name) != getattr(default, name)
        ]

    def resolve_latents(self, d_model: int) -> int:
        """Dictionary size from --latents, --expansion or the default 65536."""
        if self.n_latents is not None:
            n = self.n_latents
        elif self.expansion is not None:
            n = self.expansion * d_model
        else:
            n = 65536
        if self.arch != "jumprelu" and self.k > n:
            raise SaeError(
                f"--k {self.k} is larger than the dictionary ({n} latents); "
                "lower --k or raise --latents/--expansion"
            )
        return n

    def sae_config(self) -> SAEConfig:
        """The SAEConfig part (after resolution)."""
        names = {f.name for f in fields(SAEConfig)}
        return SAEConfig(**{key: value for key, value in asdict(self).items() if key in names})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> dict:
        """The saved config of an earlier run, as a dict (validated where it matters)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SaeError(f"cannot read {path}: {err}") from None
        if not isinstance(data, dict):
            raise SaeError(f"{path} does not hold a JSON object")
        return data
