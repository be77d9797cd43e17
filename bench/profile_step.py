"""Where one architecture's training step spends its time: torch.profiler's top CUDA kernels.

The step is the trainer's arch forward (sae.train.archs.forward, bf16 encoder), backward and a
fused Adam, at Gemma-2-2B shape on random GPU-resident batches; wall ms per step is printed
without the profiler first.

Usage (GPU):  PYTHONPATH=$PWD python bench/profile_step.py --arch batchtopk [--batch 4096 --k 128]
               [--candidates 1024]
"""

from __future__ import annotations

import argparse
import time

import torch
from provenance import source_commit

from sae.train import archs
from sae.train.model import SAEConfig, SparseAutoencoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="batchtopk")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--latents", type=int, default=65536)
    ap.add_argument("--d-model", type=int, default=2304)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--candidates", type=int, default=None, help="batchtopk: per-row candidates")
    args = ap.parse_args()
    print(f"commit {source_commit()} {torch.cuda.get_device_name()} {args}")
    cfg = SAEConfig(d_model=args.d_model, n_latents=args.latents, k=args.k, arch=args.arch)
    sae = SparseAutoencoder(cfg)
    sae.init_weights(torch.Generator().manual_seed(0))
    sae = sae.cuda()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device="cuda")
    gen.seed()
    xs = [torch.randn(args.batch, args.d_model, device="cuda", generator=gen) for _ in range(4)]

    def step(i: int) -> None:
        fwd = archs.forward(
            sae, xs[i % 4], 1e-3, 1e-3, encoder_bf16=True, batchtopk_candidates=args.candidates
        )
        fwd.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.steps):  # warm-up, compiles
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    torch.cuda.synchronize()
    print(f"{args.arch}: {(time.perf_counter() - t0) / args.steps * 1e3:.2f} ms per step (wall)")
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(10):
            step(i)
        torch.cuda.synchronize()
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=18, max_name_column_width=60
    )
    print(table)


if __name__ == "__main__":
    main()
