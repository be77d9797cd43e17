"""Every architecture through `sae train` and `sae eval` on one device, from a real on-disk cache.

CI runs the CPU paths; this checks the CUDA ones (bf16 encoder autocast, Triton kernels, fused
Adam) end to end on a small random cache: each run must finish with a finite loss and FVU.

Usage (GPU machine):  PYTHONPATH=$PWD python bench/smoke_archs.py --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import write_cache

from sae.train.config import TrainConfig
from sae.train.trainer import train

ARCHS = ("hierarchical", "topk", "batchtopk", "jumprelu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/smoke-archs")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cache = str(root / "cache")
    write_cache(cache, 120_000, 256, seed=0)
    failed = []
    for arch in ARCHS:
        for encoder_dtype in ("bfloat16", "float32"):
            cfg = TrainConfig(
                cache=cache,
                out=str(root / f"{arch}-{encoder_dtype}"),
                k=16,
                arch=arch,
                n_latents=2048,
                batch=1024,
                tokens=60 * 1024,
                device=args.device,
                eval_every=0,
                eval_tokens=1024,
                dead_tokens=2048,  # AuxK switches on
                log_every=10,
                progress=False,
                encoder_dtype=encoder_dtype,
            )
            summary = train(cfg)
            ok = all(math.isfinite(v) for v in (summary["fvu"], summary["train"]["loss"]))
            print(
                f"{arch:12s} {encoder_dtype:8s} steps {summary['steps']} "
                f"loss {summary['train']['loss']:.4g} heldout FVU {summary['fvu']:.4f} "
                f"l0 {summary['l0']:.1f} {'ok' if ok else 'NOT FINITE'}"
            )
            if not ok:
                failed.append(f"{arch}/{encoder_dtype}")
    print("all finite" if not failed else f"FAILED: {failed}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
