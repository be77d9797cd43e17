"""Benchmark of the activation store: write rate, shuffled read rate to the GPU (warm and cold page
cache), cold random-read rate by read size (the chunk-size choice), and compression ratio/speed.

    PYTHONUNBUFFERED=1 python bench/bench_store.py --dir /tmp/bench-store --rows 3000000

Data: heavy-tailed (Student-t, 3 dof) rows with a few massive-activation dims (x300) and a
per-dim offset, like a transformer residual stream; never zeros.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from sae.store import CacheWriter, open_cache

D = 2304
BATCH = 4096


def realistic_block(rows: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=(rows, d)).astype(np.float32)
    x += rng.normal(0, 0.5, size=d).astype(np.float32)  # per-dim offset
    x[:, rng.choice(d, 4, replace=False)] *= 300.0  # massive-activation dims
    return x


def write_cache(path: str, rows: int, durable: bool = False) -> dict:
    """CacheWriter's write rate; durable: the clock stops only once everything is on disk
    (os.sync after close), the fair measure between writers that fsync and writers that
    leave the page cache to flush later."""
    base = realistic_block(65536, D, 0)
    ident = {"model": "bench", "layer": 12, "d_model": D, "context": 1024}
    w = CacheWriter(path, d_model=D, total_tokens=rows, identity=ident, attrs={}, overwrite=True)
    rng = np.random.default_rng(1)
    step = 16384
    pos = (np.arange(step) % 1024).astype(np.int32)
    t0 = time.perf_counter()
    for i in range(0, rows, step):
        k = min(step, rows - i)
        block = torch.from_numpy(base[rng.integers(0, len(base), k)])
        w.append(block, np.arange(i, i + k) % 50000, pos[:k])
    w.close()
    if durable:
        os.sync()
    dt = time.perf_counter() - t0
    return {"rows": rows, "durable": durable, "seconds": dt, "GB/s": rows * D * 2 / dt / 1e9}


def drop_page_cache(path: str) -> str:
    """Evict the cache's files from the page cache: drop_caches if allowed, else fadvise."""
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for dirpath, _, names in os.walk(path):
            for name in names:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "posix_fadvise(DONTNEED)"


def stream_rate(
    path: str,
    device: str,
    n_batches: int,
    *,
    dtype=torch.float16,
    warmup: int = 20,
    verify: bool = True,
    workers: int | None = None,
    seed: int = 0,
) -> float:
    cache = open_cache(path, verify_reads=verify)
    stream = cache.batches(
        BATCH, device=device, dtype=dtype, seed=seed, epochs=None, workers=workers
    )
    it = iter(stream)
    for _ in range(warmup):
        next(it)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    checksum = float(b.float().abs().sum())  # the last batch really holds data
    assert checksum > 0
    stream.close()
    return n_batches * BATCH * D * 2 / dt / 1e9


def components(path: str, device: str) -> dict:
    """Rates of the reader's stages alone, to see which one limits the stream."""
    cache = open_cache(path)
    rows = 262144
    t0 = time.perf_counter()
    window = cache.read_rows(cache.heldout_rows[1], cache.heldout_rows[1] + rows)
    out = {"window load+crc (1 thread) GB/s": window.nbytes / (time.perf_counter() - t0) / 1e9}
    src = torch.from_numpy(window)
    pin = torch.empty((BATCH, D), dtype=torch.float16, pin_memory=device.startswith("cuda"))
    idx = torch.randperm(rows)[:BATCH]
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        torch.index_select(src, 0, idx, out=pin)
        times.append(time.perf_counter() - t0)
    out["gather GB/s"] = pin.nbytes / statistics.median(times) / 1e9
    if device.startswith("cuda"):
        dev = torch.empty_like(pin, device=device)
        times = []
        for _ in range(20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dev.copy_(pin, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out["H2D pinned GB/s"] = pin.nbytes / statistics.median(times) / 1e9
    return out


def random_read_rates(path: str, sizes_mb: list[float], budget_bytes: float) -> dict:
    """Cold random preads of `size` bytes from the shard files: what chunk size a reader needs."""
    files = sorted(str(p) for p in Path(path, "activations", "c").rglob("0") if p.is_file())
    out = {}
    rng = np.random.default_rng(0)
    for size_mb in sizes_mb:
        drop_page_cache(path)
        size = int(size_mb * 2**20)
        n = max(8, int(budget_bytes // size))
        t0 = time.perf_counter()
        done = 0
        for _ in range(n):
            f = files[rng.integers(len(files))]
            length = os.path.getsize(f)
            off = int(rng.integers(0, max(1, length - size)))
            fd = os.open(f, os.O_RDONLY)
            try:
                done += len(os.pread(fd, size, off))
            finally:
                os.close(fd)
        out[f"{size_mb} MiB"] = done / (time.perf_counter() - t0) / 1e9
    return out


def compression(rows: int = 16384) -> list[dict]:
    """Ratio and single-thread speed of candidate codecs on one realistic 2048-row chunk set."""
    import numcodecs

    x = realistic_block(rows, D, 2).astype(np.float16)
    raw = x.tobytes()
    chunk = 2048 * D * 2
    pieces = [raw[i : i + chunk] for i in range(0, len(raw), chunk)]
    codecs = {
        "zstd-1": numcodecs.Zstd(level=1),
        "zstd-3": numcodecs.Zstd(level=3),
        "blosc-lz4-shuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE, typesize=2),
        "blosc-zstd3-bitshuffle": numcodecs.Blosc(
            "zstd", 3, numcodecs.Blosc.BITSHUFFLE, typesize=2
        ),
        "blosc-zstd3-shuffle": numcodecs.Blosc("zstd", 3, numcodecs.Blosc.SHUFFLE, typesize=2),
    }
    numcodecs.blosc.set_nthreads(1)
    out = []
    for name, codec in codecs.items():
        t0 = time.perf_counter()
        enc = [codec.encode(p) for p in pieces]
        t1 = time.perf_counter()
        for e in enc:
            codec.decode(e)
        t2 = time.perf_counter()
        size = sum(len(e) for e in enc)
        out.append(
            {
                "codec": name,
                "ratio": len(raw) / size,
                "encode MB/s": len(raw) / (t1 - t0) / 1e6,
                "decode MB/s": len(raw) / (t2 - t1) / 1e6,
            }
        )
    return out


def real_compression(gguf: str, text_files: list[str], tokens: int = 4096, layer: int = 16) -> dict:
    """Codec ratios on a real model's residual stream (CPU): float32 outputs, and the same rounded
    to bfloat16 first (what a model computing in bf16 writes)."""
    import numcodecs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    text = "".join(Path(f).read_text() for f in text_files)
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        acts = torch.cat(
            [
                model(ids[:, i : i + 512], output_hidden_states=True).hidden_states[layer][0]
                for i in range(0, ids.shape[1], 512)
            ]
        )
    codecs = {
        "zstd-3": numcodecs.Zstd(3),
        "blosc-zstd3-bitshuffle": numcodecs.Blosc(
            "zstd", 3, numcodecs.Blosc.BITSHUFFLE, typesize=2
        ),
        "blosc-lz4-bitshuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE, typesize=2),
        "blosc-zstd3-shuffle": numcodecs.Blosc("zstd", 3, numcodecs.Blosc.SHUFFLE, typesize=2),
    }
    out: dict = {"rows": int(acts.shape[0]), "d_model": int(acts.shape[1])}
    for label, y in (("float32", acts), ("bf16-rounded", acts.to(torch.bfloat16).float())):
        raw = y.half().numpy().tobytes()
        out[label] = {k: round(len(raw) / len(c.encode(raw)), 3) for k, c in codecs.items()}
        out[label]["max_abs"] = float(y.abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/bench-store")
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--batches", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--real-gguf", default=None, help="only measure codecs on this model's layer")
    ap.add_argument("--text", nargs="*", default=["README.md"])
    args = ap.parse_args()
    if args.real_gguf:
        print(json.dumps(real_compression(args.real_gguf, args.text), indent=1))
        return
    results: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "rows": args.rows,
        "d_model": D,
        "batch": BATCH,
    }
    results["compression"] = compression()
    print("compression:", json.dumps(results["compression"], indent=1))
    shutil.rmtree(args.dir, ignore_errors=True)
    results["write"] = write_cache(args.dir, args.rows)
    print("write:", results["write"])
    cache = open_cache(args.dir)
    results["layout"] = cache.layout.to_attrs()
    # warm: read everything once so the page cache holds the cache
    stream_rate(args.dir, args.device, min(args.batches, args.rows // BATCH), warmup=1)
    results["components"] = components(args.dir, args.device)
    print("components", results["components"])
    for label, kw in [
        ("warm fp16 verify", {}),
        ("warm fp16 no-verify", {"verify": False}),
        ("warm fp32 verify", {"dtype": torch.float32}),
    ]:
        rates = [
            stream_rate(args.dir, args.device, args.batches, seed=r, **kw)
            for r in range(args.repeats)
        ]
        results[label] = {"GB/s median": statistics.median(rates), "all": rates}
        print(label, results[label])
    how = drop_page_cache(args.dir)
    cold_batches = min(args.batches, (args.rows // BATCH) // 2)
    results["cold fp16 verify"] = {
        "GB/s": stream_rate(args.dir, args.device, cold_batches, warmup=5, seed=99),
        "evicted with": how,
    }
    print("cold", results["cold fp16 verify"])
    results["cold random pread GB/s by size"] = random_read_rates(args.dir, [1, 4, 9, 36], 2e9)
    print("pread", results["cold random pread GB/s by size"])
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
