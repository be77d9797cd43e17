"""`sae train` throughput on one GPU: end to end from an on-disk cache vs the same step on
GPU-resident batches (the "kernel-only" rate), both measured in this process.

Shape: d_model 2304 (Gemma-2-2B), 65,536 latents, HierarchicalTopK K=128, batch 4096.
  cache:        a real Zarr cache written to local disk through CacheWriter (random-normal fp16
                activations, never zeros).
  kernel-only:  Trainer.train_step (encode + hierarchical loss + backward + Adam + decoder
                renorm) on batches already on the GPU: what the trainer could do with free data;
                with the default bfloat16 encoder and, as its baseline, --encoder-dtype float32.
  fwd+bwd:      topk_encode + hierarchical_loss + backward alone (no optimiser), for reference.
  end to end:   `sae.train.trainer.train` reading the cache (shuffled reader, prefetch, H2D),
                steady-state tokens/s from its metrics log after warm-up; GPU memory peak.
  diagnosis:    the trainer's reader alone (batches on the device, no training), and end to
                end again with checksum verification off: where a gap to kernel-only comes from.

Usage (on the GPU machine):  python bench/bench_train.py --out /tmp/bench-train
Smoke test on CPU:           python bench/bench_train.py --shape tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from provenance import source_commit

SHAPES = {
    "gemma-2-2b": {"d_model": 2304, "n_latents": 65536, "k": 128, "batch": 4096},
    "tiny": {"d_model": 64, "n_latents": 512, "k": 16, "batch": 256},
}


def write_cache(url: str, n_tokens: int, d_model: int, seed: int) -> float:
    """Write random activations through the real store; returns seconds taken."""
    from sae.store import CacheWriter

    identity = {
        "model": "bench-random",
        "model_revision": "none",
        "layer": 12,
        "hook": "resid_post",
        "d_model": d_model,
        "dtype": "float16",
        "context": 1024,
        "tokenizer": "none",
        "dataset": "random-normal",
        "dataset_config": "",
        "split": "train",
        "text_column": "text",
        "seed": seed,
    }
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with CacheWriter(
        url,
        d_model=d_model,
        total_tokens=n_tokens,
        identity=identity,
        attrs={"bench": True},
        overwrite=True,
    ) as writer:
        block = 32768
        for start in range(0, n_tokens, block):
            n = min(block, n_tokens - start)
            acts = torch.randn(n, d_model, generator=gen).to(torch.float16)
            ids = torch.randint(1, 50000, (n,), generator=gen, dtype=torch.int32)
            pos = (torch.arange(start, start + n, dtype=torch.int32) % 1024) + 1
            writer.append(acts, ids, pos)
    return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_windows(fn, device, warmup: int, windows: int, per_window: int) -> float:
    """Median seconds per call over `windows` windows of `per_window` calls, after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(per_window):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / per_window)
    return statistics.median(times)


def steady_rate(run_dir: Path, warmup: int) -> float:
    """Tokens/s of a finished run between its first metrics log at step >= warmup and its last."""
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in logs if "seconds" in r]
    first = next(r for r in logs if r["step"] >= warmup)
    return (logs[-1]["tokens"] - first["tokens"]) / (logs[-1]["seconds"] - first["seconds"])


BATCHTOPK_PATH: dict = {}  # what BatchTopK's sparse path did in kernel_only (for the JSON)


def kernel_only(
    cfg, source, shape: dict, device: torch.device, args, fwd_bwd: bool = True
) -> tuple[float, float]:
    """Median seconds of one training step, and of the hierarchical fwd+bwd alone (NaN when
    not asked for), on GPU-resident batches."""
    from sae.kernels import hierarchical_loss, topk_encode
    from sae.runtime import RankInfo
    from sae.train.trainer import Trainer

    trainer = Trainer(cfg, source, RankInfo(), device)
    batch = shape["batch"]
    widths: Counter = Counter()  # batchtopk: rows decoded at each width by its sparse path
    if cfg.arch == "batchtopk":
        from sae.train import archs

        decode = archs.topk_decode
        archs.topk_decode = lambda v, *a, **kw: (
            widths.update({v.shape[1]: v.shape[0]}) or decode(v, *a, **kw)
        )
    batches = [
        torch.from_numpy(source.cache.read_rows(i * batch, (i + 1) * batch)).to(device).float()
        for i in range(4)
    ]
    it = iter(range(10**9))
    step_s = time_windows(
        lambda: trainer.train_step(batches[next(it) % 4]), device, args.warmup, 5, 10
    )
    if cfg.arch == "batchtopk":
        per_step = []  # one synced step at a time: a late compile shows as one outlier
        for _ in range(30):
            sync(device)
            t0 = time.perf_counter()
            trainer.train_step(batches[next(it) % 4])
            sync(device)
            per_step.append(round((time.perf_counter() - t0) * 1e3, 2))
        BATCHTOPK_PATH.update(
            step_ms_one_at_a_time=sorted(per_step),
            steps=trainer.step,
            dense_steps=trainer.batchtopk_dense_steps,
            candidates=trainer.batchtopk_candidates,
            widths={str(w): n for w, n in sorted(widths.items())},
        )
        print(
            f"batchtopk: {trainer.batchtopk_dense_steps} of {trainer.step} steps had rows short of candidates (taken in full); "
            f"candidates per row now {trainer.batchtopk_candidates or 'the initial 4k'}; "
            f"kernel rows decoded at each width {dict(sorted(widths.items()))}"
        )
        archs.topk_decode = decode
    if args.profile_dir and cfg.arch in args.archs.split(","):
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                trainer.train_step(batches[next(it) % 4])
            sync(device)
        table = prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=25, max_name_column_width=60
        )
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.profile_dir) / f"{cfg.arch}.txt").write_text(table)
    sae = trainer.sae
    if not fwd_bwd:
        return step_s, float("nan")

    def fwd_bwd_step() -> None:
        x = batches[0] * sae.cfg.input_scale
        bf16 = cfg.encoder_dtype == "bfloat16" and device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            vals, idx = topk_encode(x, sae.W_enc, sae.b_enc, shape["k"], b_pre=sae.b_dec)
        hierarchical_loss(vals, idx, sae.W_dec, sae.b_dec, x, args.loss_every).backward()

    return step_s, time_windows(fwd_bwd_step, device, 5, 5, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gemma-2-2b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="/tmp/bench-train")
    parser.add_argument("--cache-tokens", type=int, default=400_000)
    parser.add_argument("--steps", type=int, default=200, help="end-to-end steps")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--loss-every", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--archs",
        default="",
        help="also time the kernel-only step of these architectures (comma-separated)",
    )
    parser.add_argument(
        "--profile-dir", default=None, help="torch.profiler tables of 5 steps of each --archs"
    )
    parser.add_argument(
        "--kernel-only", action="store_true", help="skip the end-to-end and diagnosis runs"
    )
    args = parser.parse_args()

    from sae.train.config import TrainConfig
    from sae.train.data import CacheSource

    shape = SHAPES[args.shape]
    device = torch.device(args.device)
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cache_url = str(root / "cache")
    write_s = write_cache(cache_url, args.cache_tokens, shape["d_model"], seed=0)
    print(f"cache: {args.cache_tokens} tokens x {shape['d_model']} written in {write_s:.1f}s")

    def config(
        out: Path, steps: int, encoder_dtype: str = "bfloat16", arch: str = "hierarchical"
    ) -> TrainConfig:
        return TrainConfig(
            cache=cache_url,
            out=str(out),
            k=shape["k"],
            arch=arch,
            n_latents=shape["n_latents"],
            loss_every=args.loss_every,
            batch=shape["batch"],
            tokens=steps * shape["batch"],
            device=str(device),
            eval_every=0,
            eval_tokens=8192,
            log_every=10,
            checkpoint_every=10**9,
            progress=False,
            encoder_dtype=encoder_dtype,
        )

    # --- kernel-only: the trainer's own step on GPU-resident batches ---------------------------
    # (the float32 encoder first, as the baseline of the bfloat16 default, same process)
    step32_s, fwd_bwd32_s = kernel_only(
        config(root / "kernel-only-fp32", args.steps, "float32"),
        CacheSource(cache_url),
        shape,
        device,
        args,
    )
    step_s, fwd_bwd_s = kernel_only(
        config(root / "kernel-only", args.steps), CacheSource(cache_url), shape, device, args
    )
    kernel_rate = shape["batch"] / step_s
    arch_steps = {}  # the baselines' kernel-only steps (bf16 encoder), same process
    for arch in filter(None, args.archs.split(",")):
        cfg = config(root / f"kernel-only-{arch}", args.steps, arch=arch)
        arch_steps[arch] = kernel_only(cfg, CacheSource(cache_url), shape, device, args, False)[0]
        print(f"kernel-only step, {arch}: {arch_steps[arch] * 1e3:.2f} ms")
    result = {
        "shape": args.shape,
        **shape,
        "loss_every": args.loss_every,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": source_commit(),
        "cache_tokens": args.cache_tokens,
        "cache_write_s": write_s,
        "kernel_only_step_ms_fp32_encoder": step32_s * 1e3,
        "fwd_bwd_ms_fp32_encoder": fwd_bwd32_s * 1e3,
        "kernel_only_step_ms": step_s * 1e3,
        "kernel_only_tokens_per_s": kernel_rate,
        "fwd_bwd_ms": fwd_bwd_s * 1e3,
        "kernel_only_step_ms_by_arch": {a: t * 1e3 for a, t in arch_steps.items()},
        "batchtopk_sparse_path": BATCHTOPK_PATH,
    }
    if not args.kernel_only:
        result.update(end_to_end(args, shape, device, root, cache_url, config, kernel_rate))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| kernel-only step, float32 encoder (ms, median) | {step32_s * 1e3:.2f} |")
    print(f"| fwd+bwd only, float32 encoder (ms) | {fwd_bwd32_s * 1e3:.2f} |")
    print(f"| kernel-only step (ms, median) | {step_s * 1e3:.2f} |")
    print(f"| kernel-only tokens/s | {kernel_rate:,.0f} |")
    print(f"| fwd+bwd only (ms) | {fwd_bwd_s * 1e3:.2f} |")
    for arch, t in arch_steps.items():
        print(f"| kernel-only step, {arch} (ms, median) | {t * 1e3:.2f} |")
    if args.kernel_only:
        return
    print(f"| end-to-end tokens/s (steady) | {result['e2e_tokens_per_s']:,.0f} |")
    print(f"| end-to-end / kernel-only | {result['e2e_vs_kernel_only']:.1%} |")
    print(f"| reader alone (no training) tokens/s | {result['reader_alone_tokens_per_s']:,.0f} |")
    print(
        "| end-to-end without checksum verification tokens/s | "
        f"{result['e2e_unverified_tokens_per_s']:,.0f} |"
    )
    for w, rate in result["e2e_verified_by_read_workers"].items():
        print(f"| end-to-end, verified, {w} reader thread(s) tokens/s | {rate:,.0f} |")
    print(f"| GPU memory peak | {result['gpu_peak_gib']:.2f} GiB |")


def end_to_end(args, shape, device, root: Path, cache_url: str, config, kernel_rate) -> dict:
    """The trainer from the on-disk cache, then the diagnosis runs: the reader alone, and end
    to end without checksums and with 1 and 2 reader threads."""
    from sae.store import open_cache
    from sae.train.data import CacheSource
    from sae.train.trainer import train

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run_dir = root / "run"
    t0 = time.perf_counter()
    summary = train(config(run_dir, args.steps))
    e2e_wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    e2e_rate = steady_rate(run_dir, args.warmup)

    src = CacheSource(cache_url)
    it = src.train_batches(shape["batch"], seed=1, rank=0, world_size=1, device=device, cursor=None)
    for _ in range(10):
        next(it)
    t0 = time.perf_counter()
    n_read = 100
    for _ in range(n_read):
        batch_t = next(it)
    if device.type == "cuda":
        batch_t.sum().item()
    reader_rate = n_read * shape["batch"] / (time.perf_counter() - t0)
    it.stream.close()

    def e2e(name: str, source: CacheSource) -> float:
        train(config(root / name, args.steps), source)
        return steady_rate(root / name, args.warmup)

    unverified = CacheSource(cache_url)
    unverified.cache = open_cache(cache_url, verify_reads=False)
    e2e_unverified = e2e("run-unverified", unverified)
    e2e_workers = {
        w: e2e(f"run-workers-{w}", CacheSource(cache_url, read_workers=w)) for w in (1, 2)
    }
    return {
        "e2e_tokens_per_s": e2e_rate,
        "e2e_vs_kernel_only": e2e_rate / kernel_rate,
        "reader_alone_tokens_per_s": reader_rate,
        "e2e_unverified_tokens_per_s": e2e_unverified,
        "e2e_verified_by_read_workers": e2e_workers,
        "e2e_steps": summary["steps"],
        "e2e_wall_s": e2e_wall,
        "gpu_peak_gib": peak / 2**30,
        "final_train_loss": summary["train"].get("loss"),
    }


if __name__ == "__main__":
    main()
