"""BatchTopK's batch-wide cut (the n·k-th largest activation of the batch) by several methods.

The cut is taken over each row's candidates on the sparse path ((B, 4k) or more) and over the
dense (B, F) activations on the dense path; this times how it is taken now (an unsorted
torch.topk of n·k values, sae.train.distributed.global_threshold) against alternatives that
give the same value, on ReLU'd normal inputs (about half zeros, as in a young SAE).

Usage (GPU):  PYTHONPATH=$PWD python bench/bench_batch_cut.py [--batch 4096 --k 128]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from provenance import source_commit


def timed(fn, reps: int = 20) -> float:
    """Median ms of fn over reps calls after 3 warm-up calls (CUDA events)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--widths", default="512,1024,65536")
    args = ap.parse_args()
    print(f"commit {source_commit()} {torch.cuda.get_device_name()} {args}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    n_keep = args.batch * args.k
    for width in map(int, args.widths.split(",")):
        acts = torch.randn(args.batch, width, device="cuda", generator=gen).relu()
        flat = acts.reshape(-1)
        methods = {
            "topk unsorted (now)": lambda f=flat: f.topk(n_keep, sorted=False).values.min(),
            "sort descending": lambda f=flat: f.sort(descending=True).values[n_keep - 1],
            "kthvalue": lambda f=flat: f.kthvalue(f.numel() - n_keep + 1).values,
        }
        want = methods["topk unsorted (now)"]()
        for name, fn in methods.items():
            same = bool(fn() == want)
            print(
                f"cut B={args.batch} width={width} n_keep={n_keep} {name}: "
                f"{timed(fn):.3f} ms same={same}"
            )
        del acts, flat


if __name__ == "__main__":
    main()
