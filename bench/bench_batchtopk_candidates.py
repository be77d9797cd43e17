"""How many candidates per row should BatchTopK's sparse path take?

The sparse path (sae.train.archs.forward_batchtopk) takes each row's top n_cand activations as
candidates for the batch-wide cut; a row whose last candidate is at or above the cut is encoded
and decoded densely instead. Both are exact, so n_cand only trades the candidates' row top-k
(grows with n_cand) against the dense rows (fewer with more candidates, but any dense row costs
a full (F, D) gradient for W_enc and W_dec). This times the trainer's kernel-only step for a few
policies (start, cap) in one process, on two kinds of data, with the TopK step as the baseline:

  normal:   i.i.d. normal activations (what bench_train.py's cache holds);
  planted:  32 of 16,384 random directions per token with log-normal token norms (σ = 0.5),
            as bench/batchtopk_paths.py, so some rows hold far more of the batch's n·k.

Usage (GPU):  PYTHONPATH=$PWD python bench/bench_batchtopk_candidates.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from batchtopk_paths import planted
from bench_train import sync, time_windows
from provenance import source_commit

from sae.runtime import RankInfo
from sae.train import archs
from sae.train.config import TrainConfig
from sae.train.data import TensorSource
from sae.train.trainer import Trainer

# (name, candidates per k at the start, cap): the cap is where doubling after a dense batch stops
POLICIES = [
    ("4k doubling to 1024 (default)", 4, 1024),
    ("2k doubling to 1024", 2, 1024),
    ("2k fixed (256)", 2, 256),
    ("4k fixed (512)", 4, 512),
    ("8k fixed (1024)", 8, 1024),
]


def batches(kind: str, n: int, batch: int, d_model: int, device: str) -> list[torch.Tensor]:
    if kind == "normal":
        gen = torch.Generator(device=device).manual_seed(0)
        return [torch.randn(batch, d_model, device=device, generator=gen) for _ in range(n)]
    acts = planted(n * batch, d_model, 16384, 32, 0, device).to(device)
    return list(acts.split(batch))


def step_ms(arch: str, data: list[torch.Tensor], args, root: Path) -> tuple[float, Trainer]:
    cfg = TrainConfig(
        cache="memory",
        out=str(root / arch),
        arch=arch,
        k=args.k,
        n_latents=args.latents,
        batch=args.batch,
        tokens=10**6 * args.batch,
        eval_every=0,
        eval_tokens=data[0].shape[0],
        log_every=10**9,
        checkpoint_every=10**9,
        progress=False,
        device=args.device,
        seed=0,
    )
    source = TensorSource(torch.cat(data[:2]).cpu(), data[0][:1024].cpu())
    trainer = Trainer(cfg, source, RankInfo(), torch.device(args.device))
    it = iter(range(10**9))
    ms = 1e3 * time_windows(
        lambda: trainer.train_step(data[next(it) % len(data)]),
        torch.device(args.device),
        args.warmup,
        5,
        10,
    )
    return ms, trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--latents", type=int, default=65536)
    ap.add_argument("--d-model", type=int, default=2304)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--kinds", default="normal,planted")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"commit {source_commit()} {name} {args}")
    rows = []
    saved = archs.CANDIDATES_PER_K, archs.MAX_CANDIDATES
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            data = batches(kind, 8, args.batch, args.d_model, args.device)
            topk_ms, _ = step_ms("topk", data, args, Path(tmp) / kind)
            rows.append({"data": kind, "policy": "TopK (baseline)", "step_ms": topk_ms})
            print(json.dumps(rows[-1]))
            for policy, per_k, cap in POLICIES:
                archs.CANDIDATES_PER_K, archs.MAX_CANDIDATES = per_k, cap
                ms, trainer = step_ms("batchtopk", data, args, Path(tmp) / kind / policy[:2])
                rows.append(
                    {
                        "data": kind,
                        "policy": policy,
                        "step_ms": ms,
                        "vs_topk": ms / topk_ms,
                        "steps": trainer.step,
                        "steps_with_dense_rows": trainer.batchtopk_dense_steps,
                        "candidates_at_end": trainer.batchtopk_candidates or per_k * args.k,
                    }
                )
                print(json.dumps(rows[-1]))
                del trainer
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            archs.CANDIDATES_PER_K, archs.MAX_CANDIDATES = saved
            sync(torch.device(args.device))
    print("\n| data | policy | step ms | × TopK | steps with dense rows | candidates at end |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        extra = (
            f"{r['vs_topk']:.2f} | {r['steps_with_dense_rows']} of {r['steps']} | "
            f"{r['candidates_at_end']}"
            if "vs_topk" in r
            else "1 | — | —"
        )
        print(f"| {r['data']} | {r['policy']} | {r['step_ms']:.2f} | {extra} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"commit": source_commit(), "device": name, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
