"""BatchTopK trained through its sparse path and through the dense path: same run, same result?

Both paths are exact, so two runs from the same seed on the same batches should end within
floating-point noise of each other (the sums run in another order, and bf16 encoder rounding
differs). This trains one SAE per path at Gemma-2-2B shape on planted activations (a random
dictionary, a few dozen active directions per token, and per-token norms from a log-normal so
some rows hold far more of the batch's n·k than others, as real activations do), then compares
the held-out FVU, ℓ0, θ and dead latents, and the wall time.

Usage (GPU):  PYTHONPATH=$PWD python bench/batchtopk_paths.py [--steps 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from provenance import source_commit

from sae.train.checkpoint import checkpoint_path
from sae.train.config import TrainConfig
from sae.train.data import TensorSource
from sae.train.trainer import train


def planted(
    n_tokens: int, d_model: int, n_features: int, active: int, seed: int, dev: str
) -> torch.Tensor:
    """(n_tokens, d_model) fp32 on the CPU: `active` directions per token, log-normal norms."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    dictionary = torch.randn(n_features, d_model, device=dev, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    out = torch.empty(n_tokens, d_model)
    for start in range(0, n_tokens, 8192):
        n = min(8192, n_tokens - start)
        which = torch.randint(0, n_features, (n, active), device=dev, generator=gen)
        mags = torch.rand(n, active, device=dev, generator=gen) * 2 + 1
        coef = torch.zeros(n, n_features, device=dev).scatter_add_(1, which, mags)
        norms = torch.randn(n, 1, device=dev, generator=gen).mul(0.5).exp()
        out[start : start + n] = (coef @ dictionary * norms).cpu()
    return out


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def run(path: str, source: TensorSource, args, root: Path) -> dict:
    os.environ["SAE_BATCHTOPK"] = path
    cfg = TrainConfig(
        cache="memory",
        out=str(root / path),
        arch="batchtopk",
        k=args.k,
        n_latents=args.latents,
        batch=args.batch,
        tokens=args.steps * args.batch,
        eval_every=0,
        eval_tokens=8192,
        log_every=10,
        checkpoint_every=10**9,
        progress=False,
        device=args.device,
        seed=0,
    )
    sync(args.device)
    t0 = time.perf_counter()
    summary = train(cfg, source)
    sync(args.device)
    wall = time.perf_counter() - t0
    ckpt = torch.load(checkpoint_path(root / path), weights_only=True, map_location="cpu")
    row = {
        "path": path,
        "wall_s": wall,
        "ms_per_step": wall / args.steps * 1e3,
        "heldout_fvu": summary["fvu"],
        "heldout_l0": summary["l0"],
        "dead": summary["dead"],
        "train_fvu": summary["train"].get("fvu"),
        "theta": float(ckpt["theta"]),
        "steps_with_dense_rows": int(ckpt.get("batchtopk_dense_steps", 0)),
        "candidates": int(ckpt.get("batchtopk_candidates", 0)),
    }
    print(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--latents", type=int, default=65536)
    ap.add_argument("--d-model", type=int, default=2304)
    ap.add_argument("--features", type=int, default=16384, help="planted dictionary size")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"commit {source_commit()} {name} {args}")
    acts = planted(args.steps * args.batch + 8192, args.d_model, args.features, 32, 0, args.device)
    source = TensorSource(acts[8192:], acts[:8192])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(path, source, args, Path(tmp)) for path in ("dense", "sparse")]
    result = {"commit": source_commit(), "device": name, "runs": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
