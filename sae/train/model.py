"""The sparse autoencoder every architecture shares, and its on-disk form (safetensors + JSON).

x̂ = W_dec·σ(W_enc(x·s − b_dec) + b_enc) + b_dec, with s the input scale that brings the cache's
mean squared norm to d_model. Weights live in "SAE space"; `reconstruct` returns model space.
Only σ differs between architectures, and at inference it is either per-token top-k or a
JumpReLU threshold (BatchTopK's global θ, JumpReLU's learned per-latent θ).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from sae.atomic import atomic_write, atomic_write_text
from sae.errors import SaeError
from sae.kernels import topk_decode, topk_encode

ARCHS = ("hierarchical", "topk", "batchtopk", "jumprelu")
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
ENCODE_MODES = ("topk", "threshold")


@dataclass
class SAEConfig:
    """What is needed to rebuild a trained SAE and say where its inputs came from."""

    d_model: int
    n_latents: int
    k: int  # training k (K for hierarchical); unused by jumprelu (0 allowed)
    arch: str  # "hierarchical" | "topk" | "batchtopk" | "jumprelu"
    loss_every: int = 1  # hierarchical J_m
    input_scale: float = 1.0  # x_model * input_scale = x_sae
    model: str = ""
    layer: int = -1
    hook: str = ""
    cache_url: str = ""
    context: int = 0

    def validate(self) -> None:
        """Raise SaeError on values no SAE can have (config.json is read from disk)."""
        ints = {"d_model": 1, "n_latents": 1, "k": 0, "loss_every": 1, "layer": -1, "context": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SaeError(f"SAE config: {name} must be an integer >= {low}, got {value!r}")
        if self.arch not in ARCHS:
            raise SaeError(f"SAE config: arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.arch != "jumprelu" and self.k < 1:
            raise SaeError(f"SAE config: k must be >= 1 for arch {self.arch}, got {self.k}")
        if self.arch != "jumprelu" and self.k > self.n_latents:
            raise SaeError(
                f"k={self.k} is larger than the dictionary ({self.n_latents} latents); "
                "lower --k or raise --latents/--expansion"
            )
        scale = self.input_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise SaeError(f"SAE config: input_scale must be a number, got {scale!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise SaeError(f"SAE config: input_scale must be finite and > 0, got {scale!r}")
        for name in ("arch", "model", "hook", "cache_url"):
            if not isinstance(getattr(self, name), str):
                raise SaeError(f"SAE config: {name} must be a string")

    @classmethod
    def from_dict(cls, data: dict) -> SAEConfig:
        """Pick this class's fields out of a (possibly larger, e.g. TrainConfig) JSON object."""
        names = {f.name for f in fields(cls)}
        required = {"d_model", "n_latents", "k", "arch"}
        missing = sorted(required - data.keys())
        if missing:
            raise SaeError(f"SAE config is missing {', '.join(missing)}")
        cfg = cls(**{key: value for key, value in data.items() if key in names})
        if isinstance(cfg.input_scale, int) and not isinstance(cfg.input_scale, bool):
            cfg.input_scale = float(cfg.input_scale)
        cfg.validate()
        return cfg


class SparseAutoencoder(nn.Module):
    """W_enc (F, D), b_enc (F,), W_dec (F, D) with unit-norm rows, b_dec (D,), threshold (F,).

    `threshold` is a learned parameter for jumprelu and a buffer otherwise (BatchTopK's θ,
    broadcast to every latent; zero for top-k SAEs, where threshold mode is plain ReLU).
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        F, D = cfg.n_latents, cfg.d_model
        self.W_enc = nn.Parameter(torch.zeros(F, D))
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter(torch.zeros(F, D))
        self.b_dec = nn.Parameter(torch.zeros(D))
        if cfg.arch == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(F))
        else:
            self.register_buffer("threshold", torch.zeros(F))

    # --- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random unit decoder rows, W_enc = W_dec (i.e. W_decᵀ in column form), zero biases."""
        W = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # --- forward pieces -------------------------------------------------------------------
    def center(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space input → SAE-space input with the decoder bias removed."""
        return x.to(self.W_enc.dtype) * self.cfg.input_scale - self.b_dec

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) pre-activations (x·s − b_dec) W_encᵀ + b_enc, in SAE space."""
        return self.center(x) @ self.W_enc.T + self.b_enc

    def _k(self, k: int | None) -> int:
        k = self.cfg.k if k is None else int(k)
        if k < 1 or k > self.cfg.n_latents:
            raise SaeError(f"k must be between 1 and {self.cfg.n_latents}, got {k}")
        return k

    def encode(
        self, x: torch.Tensor, k: int | None = None, mode: str = "topk"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(vals (B, k) sorted descending, idx (B, k)) of the active latents.

        mode "topk": relu(top-k pre-activations), k defaulting to cfg.k. mode "threshold": the
        latents above their threshold; k defaults to the most any row has (rows with fewer are
        padded with zero values), so the pair decodes to exactly the dense threshold encoding.
        """
        if mode == "topk":
            return topk_encode(self.center(x), self.W_enc, self.b_enc, self._k(k))
        dense = self.encode_dense(x, mode=self._mode(mode))
        if k is None:
            k = max(1, int((dense > 0).sum(dim=1).max().item()) if dense.numel() else 1)
        vals, idx = dense.topk(self._k(k), dim=1, sorted=True)
        return vals, idx

    @staticmethod
    def _mode(mode: str) -> str:
        if mode not in ENCODE_MODES:
            raise SaeError(f"encode mode must be one of {', '.join(ENCODE_MODES)}, got {mode!r}")
        return mode

    def encode_dense(
        self, x: torch.Tensor, k: int | None = None, mode: str = "topk"
    ) -> torch.Tensor:
        """(B, F) latent activations: top-k scattered into zeros, or pre·[pre > threshold]."""
        if self._mode(mode) == "topk":
            vals, idx = self.encode(x, k, mode="topk")
            out = torch.zeros(x.shape[0], self.cfg.n_latents, dtype=vals.dtype, device=vals.device)
            return out.scatter_(1, idx, vals)
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold.clamp_min(0))

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, D) SAE-space reconstruction b_dec + Σ vals_i W_dec[idx_i]."""
        return topk_decode(vals, idx, self.W_dec, self.b_dec)

    def decode_dense(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, D) SAE-space reconstruction from dense latents."""
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def reconstruct(
        self, x: torch.Tensor, k: int | None = None, mode: str = "topk"
    ) -> torch.Tensor:
        """(B, D) reconstruction of x in model space (the input scale undone)."""
        if self._mode(mode) == "topk":
            recon = self.decode(*self.encode(x, k, mode="topk"))
        else:
            recon = self.decode_dense(self.encode_dense(x, mode="threshold"))
        return recon / self.cfg.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference reconstruction in model space with the architecture's natural σ."""
        mode = "threshold" if self.cfg.arch in ("batchtopk", "jumprelu") else "topk"
        return self.reconstruct(x, mode=mode)

    # --- files ----------------------------------------------------------------------------
    def save(self, directory: str | Path, config_json: str | None = None) -> None:
        """Write sae.safetensors + config.json into `directory`, each atomically.

        config.json holds the SAEConfig, or `config_json` when given (the trainer's TrainConfig,
        a superset that also lets the run resume): one write, so no kill leaves a config that
        is neither."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
        text = config_json if config_json is not None else json.dumps(asdict(self.cfg), indent=2)
        atomic_write_text(directory / CONFIG_FILE, text.rstrip("\n") + "\n")


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE directory (config.json + sae.safetensors); SaeError if it is not one."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise SaeError(f"{directory} is not a directory; pass the --out directory of `sae train`")
    if not config_path.is_file() or not weights_path.is_file():
        raise SaeError(
            f"{directory} is not an SAE directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
            "pass the --out directory of a finished `sae train`"
        )
    try:
        data = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaeError(f"cannot read {config_path}: {err}") from None
    if not isinstance(data, dict):
        raise SaeError(f"{config_path} does not hold a JSON object")
    cfg = SAEConfig.from_dict(data)
    # Shapes from the file's header against the config before anything is allocated (a config
    # from elsewhere may claim any size), then dtypes and values: weights are untrusted too.
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in SparseAutoencoder(cfg).state_dict().items()}
    try:
        with safe_open(str(weights_path), framework="pt") as header:
            found = {name: tuple(header.get_slice(name).get_shape()) for name in header.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as err:
        raise SaeError(f"cannot read {weights_path}: {err}") from None
    if expected != found:
        raise SaeError(
            f"{weights_path} does not match {config_path}: expected tensors {expected}, "
            f"found {found}"
        )
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as err:
        raise SaeError(f"cannot read {weights_path}: {err}") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise SaeError(f"{weights_path}: {name} is {t.dtype}, not a floating-point tensor")
        if not torch.isfinite(t).all():
            raise SaeError(f"{weights_path}: {name} holds NaN or infinite values")
    sae = SparseAutoencoder(cfg)
    sae.load_state_dict({name: t.float() for name, t in tensors.items()})
    return sae.to(device)
