"""Fused SAE kernels on one GPU: correctness against float64, then timings side by side.

Parts (all in one process, so ratios compare like with like):
  check:  Triton path vs a float64 PyTorch reference on the GPU (fp32 inputs: rel err < 1e-4;
          bf16 activations: < 1e-2), deterministic mode repeats bitwise.
  op:     the decoder-side hierarchical loss op (given vals, idx, W_dec, b_dec, x: forward +
          backward, fp32) for ours / the paper's Listing 1 in eager PyTorch / Listing 1 under
          torch.compile; and our TopK op (sparse decode + squared error, forward + backward).
  step:   the full training step (encoder forward in bf16 autocast, top-k, hierarchical loss,
          every backward incl. W_enc's, fused Adam) for ours / naive / torch.compile, and ours
          with one stage left out at a time (where the time goes).
Shapes: F = 65,536 latents, D = 2304, K in {32, 64, 128}, batch in {4096, 8192}; random inputs.

Usage (GPU):  PYTHONPATH=$PWD python bench/bench_kernels.py --out $OUT [--parts check,op,step]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from provenance import source_commit

from sae import kernels
from sae.kernels import reference

F, D = 65536, 2304
KS = (32, 64, 128)
BATCHES = (4096, 8192)
GIB = 2**30


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - ref).norm() / ref.norm())


def random_sparse(b: int, k: int, f: int, dev, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random latents per row (as top-k gives) and positive values sorted descending."""
    idx = torch.rand(b, f, device=dev, generator=gen).topk(k, dim=1).indices
    vals = (torch.rand(b, k, device=dev, generator=gen) + 0.05).sort(1, descending=True).values
    return vals, idx


def leaves(*ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in ts]


# ----------------------------------------------------------------------------- correctness
def check(gen, log) -> list[dict]:
    dev = "cuda"
    rows = []

    def record(name, errs, tol, info=None):
        ok = all(e == e and e < tol for e in errs.values())
        rows.append({"check": name, "tol": tol, "ok": ok, **errs, **(info or {})})
        log(f"check {name}: {'ok' if ok else 'FAIL'} {json.dumps({**errs, **(info or {})})}")

    for b, d, f, k, every in [
        (333, 2304, F, 128, 1),
        (333, 2304, F, 128, 8),
        (129, 771, 4096, 200, 200),
    ]:
        vals, idx = random_sparse(b, k, f, dev, gen)
        w = torch.randn(f, d, device=dev, generator=gen) / d**0.5
        bias = torch.randn(d, device=dev, generator=gen) * 0.1
        x = torch.randn(b, d, device=dev, generator=gen)
        ref = leaves(vals, w, bias, x, dtype=torch.float64)
        ref_loss = reference.hierarchical_loss(ref[0], idx, ref[1], ref[2], ref[3], every)
        ref_loss.backward()
        for act, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
            for det in (False, True):
                ps = leaves(vals.to(act), w, bias, x.to(act))
                loss = kernels.hierarchical_loss(
                    ps[0], idx, ps[1], ps[2], ps[3], every, backend="triton", deterministic=det
                )
                loss.backward()
                errs = {"loss": rel_err(loss, ref_loss)}
                for n, p, r in zip(("vals", "W_dec", "b_dec", "x"), ps, ref, strict=True):
                    errs[n] = rel_err(p.grad, r.grad)
                name = f"hier B={b} D={d} K={k} every={every} {str(act)[6:]} det={det}"
                record(name, errs, tol)
        # topk decode
        g_out = torch.randn(b, d, device=dev, generator=gen)
        ref = leaves(vals, w, bias, dtype=torch.float64)
        reference.topk_decode(ref[0], idx, ref[1], ref[2]).backward(g_out.double())
        for det in (False, True):
            ps = leaves(vals, w, bias)
            out = kernels.topk_decode(ps[0], idx, ps[1], ps[2], backend="triton", deterministic=det)
            out.backward(g_out)
            ref_out = reference.topk_decode(vals.double(), idx, w.double(), bias.double())
            errs = {"out": rel_err(out, ref_out)}
            for n, p, r in zip(("vals", "W_dec", "b_dec"), ps, ref, strict=True):
                errs[n] = rel_err(p.grad, r.grad)
            record(f"decode B={b} D={d} K={k} det={det}", errs, 1e-4)
        # encoder sparse backward (reference evaluated at our indices)
        w_enc = torch.randn(f, d, device=dev, generator=gen) / d**0.5
        b_enc = torch.randn(f, device=dev, generator=gen) * 0.1
        weights = torch.randn(b, k, device=dev, generator=gen)
        for act, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
            for det in (False, True):
                ps = leaves(x.to(act), w_enc, b_enc)
                ev, ei = kernels.topk_encode(*ps, k, backend="triton", deterministic=det)
                (ev * weights).sum().backward()
                rs = leaves(x.to(act), w_enc, b_enc, dtype=torch.float64)
                rv = (rs[0] @ rs[1].T + rs[2]).gather(1, ei).relu()
                (rv * weights.double()).sum().backward()
                ref_idx = (x.double() @ w_enc.double().T + b_enc.double()).topk(k, dim=1).indices
                same = (ei.sort(1).values == ref_idx.sort(1).values).float().mean().item()
                errs = {"vals": rel_err(ev, rv)}
                for n, p, r in zip(("x", "W_enc", "b_enc"), ps, rs, strict=True):
                    errs[n] = rel_err(p.grad, r.grad)
                # informational: bf16 rounding reorders near-ties of the top-k
                name = f"encode B={b} D={d} K={k} {str(act)[6:]} det={det}"
                record(name, errs, tol, {"idx_match": same})
        # the trainer's encoder: fp32 x under bf16 autocast. W_enc's gradient is that of the
        # bf16 product, Σ g · bf16(x) per latent (g: the bf16 gradient reaching the bf16 vals).
        for det in (False, True):
            ps = leaves(w_enc, b_enc)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ev, ei = kernels.topk_encode(x, *ps, k, backend="triton", deterministic=det)
            (ev.float() * weights).sum().backward()
            g = weights.to(torch.bfloat16).double() * (ev.detach() > 0)
            xb = x.to(torch.bfloat16).double()
            ref_w = torch.zeros(f, d, dtype=torch.float64, device=dev)
            ref_w.index_add_(0, ei.reshape(-1), (g[:, :, None] * xb[:, None, :]).reshape(-1, d))
            ref_b = torch.zeros(f, dtype=torch.float64, device=dev)
            ref_b.index_add_(0, ei.reshape(-1), g.reshape(-1))
            errs = {"W_enc": rel_err(ps[0].grad, ref_w), "b_enc": rel_err(ps[1].grad, ref_b)}
            record(f"encode autocast B={b} D={d} K={k} det={det}", errs, 1e-4)
        del w, w_enc
    # BatchTopK: per-row candidates + sparse kernels vs the dense (B, F) path, fp32 and bf16
    # encoder (the trainer's arch forward, loss and every parameter's gradient)
    from sae.train import archs
    from sae.train.model import SAEConfig, SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_model=D, n_latents=F, k=32, arch="batchtopk"))
    sae.init_weights(torch.Generator().manual_seed(0))
    sae = sae.to(dev)
    plain = torch.randn(512, D, device=dev, generator=gen)
    heavy = plain.clone()
    heavy[::100] *= 20.0  # 6 rows hold more than their candidates: taken in full
    n_cand = archs.CANDIDATES_PER_K * sae.cfg.k
    for (bf16, tol), (kind, xb) in itertools.product(
        ((False, 1e-4), (True, 1e-2)), (("plain", plain), ("heavy", heavy))
    ):
        outs = {}
        for sparse in (False, True):
            sae.zero_grad(set_to_none=True)
            fwd = archs.forward_batchtopk(sae, xb, encoder_bf16=bf16, sparse=sparse)
            fwd.loss.backward()
            outs[sparse] = [fwd.loss.detach(), *(p.grad.clone() for p in sae.parameters())]
        decode, calls = archs.topk_decode, []
        archs.topk_decode = lambda *a, c=calls, f=decode, **kw: c.append(1) or f(*a, **kw)
        with torch.no_grad():
            target = xb * sae.cfg.input_scale
            took, _ = archs._batchtopk_sparse(
                sae, target, target - sae.b_dec, 512 * 32, bf16, None, False, n_cand
            )
        archs.topk_decode = decode
        names = ["loss", *(n for n, _ in sae.named_parameters())]
        errs = {n: rel_err(a, r) for n, a, r in zip(names, outs[True], outs[False], strict=True)}
        info = {"dense_rows": took.dense_rows, "decode_calls": len(calls)}
        record(f"batchtopk sparse vs dense bf16_encoder={bf16} rows={kind}", errs, tol, info)
    del sae
    # determinism: bitwise repeat at full size
    vals, idx = random_sparse(2048, 128, F, dev, gen)
    w = torch.randn(F, D, device=dev, generator=gen) / D**0.5
    bias, x = torch.zeros(D, device=dev), torch.randn(2048, D, device=dev, generator=gen)

    def run():
        ps = leaves(vals, w, bias, x)
        kernels.hierarchical_loss(*ps[:1], idx, *ps[1:], 1, deterministic=True).backward()
        return [p.grad for p in ps]

    same = all(torch.equal(a, c) for a, c in zip(run(), run(), strict=True))
    rows.append({"check": "deterministic bitwise repeat B=2048 K=128", "ok": same})
    log(f"check deterministic repeat: {'ok' if same else 'FAIL'}")
    return rows


# ----------------------------------------------------------------------------- timing
def bench(fn, warmup=50, rep=300) -> tuple[float, float]:
    """(median ms, peak GiB over the timed calls)."""
    from triton.testing import do_bench

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return ms, torch.cuda.max_memory_allocated() / GIB


def guarded(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), float("nan")


def listing1(vals, idx, w_dec, b_dec, x):
    return reference.listing1_loss(vals, idx, w_dec, b_dec, x)


_compiled_listing1 = None


def compiled_listing1(*args):
    global _compiled_listing1
    if _compiled_listing1 is None:
        _compiled_listing1 = torch.compile(listing1, dynamic=False)
    return _compiled_listing1(*args)


def time_op(b, k, gen, log, skip) -> list[dict]:
    dev = "cuda"
    vals0, idx = random_sparse(b, k, F, dev, gen)
    w = (torch.randn(F, D, device=dev, generator=gen) / D**0.5).requires_grad_()
    bias = (torch.randn(D, device=dev, generator=gen) * 0.1).requires_grad_()
    x = torch.randn(b, D, device=dev, generator=gen)
    vals = vals0.clone().requires_grad_()
    params = (vals, w, bias)

    def step(loss_fn):
        def run():
            for p in params:
                p.grad = None
            loss_fn().backward()

        return run

    variants = {
        "ours hier": lambda: kernels.hierarchical_loss(vals, idx, w, bias, x, 1),
        "ours hier every=8": lambda: kernels.hierarchical_loss(vals, idx, w, bias, x, 8),
        "ours hier det": lambda: kernels.hierarchical_loss(
            vals, idx, w, bias, x, 1, deterministic=True
        ),
        "ours topk op": lambda: (
            (kernels.topk_decode(vals, idx, w, bias) - x).square().sum(-1).mean()
        ),
        "listing1 eager": lambda: listing1(vals, idx, w, bias, x),
        "listing1 compile": lambda: compiled_listing1(vals, idx, w, bias, x),
    }
    rows = []
    for name, fn in variants.items():
        if name in skip:
            continue
        ms, gib = guarded(bench, step(fn))
        rows.append({"part": "op", "variant": name, "batch": b, "k": k, "ms": ms, "peak_gib": gib})
        log(f"op B={b} K={k} {name}: {ms:.3f} ms {gib:.2f} GiB")
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()
    return rows


class Model:
    """Parameters + fused Adam of one SAE, the shapes of the benchmark."""

    def __init__(self, gen):
        dev = "cuda"
        self.w_enc = (torch.randn(F, D, device=dev, generator=gen) / D**0.5).requires_grad_()
        self.b_enc = torch.zeros(F, device=dev).requires_grad_()
        self.w_dec = self.w_enc.detach().clone().requires_grad_()
        self.b_dec = (torch.randn(D, device=dev, generator=gen) * 0.1).requires_grad_()
        self.params = [self.w_enc, self.b_enc, self.w_dec, self.b_dec]
        self.opt = torch.optim.Adam(self.params, lr=1e-5, fused=True)


def ours_loss(m: Model, x, k, encode_only=False):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vals, idx = kernels.topk_encode(x, m.w_enc, m.b_enc, k, b_pre=m.b_dec)
    if encode_only:
        return vals.float().sum()
    return kernels.hierarchical_loss(vals, idx, m.w_dec, m.b_dec, x, 1)


def naive_loss(m: Model, x, k):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vals, idx = reference.topk_encode(x - m.b_dec, m.w_enc, m.b_enc, k)
    return listing1(vals.float(), idx, m.w_dec, m.b_dec, x)


_compiled_naive = None


def compiled_naive_loss(m, x, k):
    global _compiled_naive
    if _compiled_naive is None:
        _compiled_naive = torch.compile(naive_loss, dynamic=False)
    return _compiled_naive(m, x, k)


def time_step(b, k, gen, log, variants) -> list[dict]:
    m = Model(gen)
    xs = [torch.randn(b, D, device="cuda", generator=gen) for _ in range(2)]
    state = {"i": 0}

    def make(loss_fn, backward=True, adam=True):
        def run():
            m.opt.zero_grad(set_to_none=True)
            x = xs[state["i"] % 2]
            state["i"] += 1
            loss = loss_fn(m, x, k)
            if backward:
                loss.backward()
            if adam:
                m.opt.step()
            m.opt.zero_grad(set_to_none=True)

        return run

    table = {
        "ours": make(ours_loss),
        "ours no adam": make(ours_loss, adam=False),
        "ours fwd only": make(ours_loss, backward=False, adam=False),
        "ours encode+topk only (fwd+bwd)": make(
            lambda m_, x, k_: ours_loss(m_, x, k_, encode_only=True), adam=False
        ),
        "naive": make(naive_loss),
        "compile": make(compiled_naive_loss),
    }
    rows = []
    # Adam needs its state before timing (first step allocates it).
    make(ours_loss)()
    for name in variants:
        ms, gib = guarded(bench, table[name], 25, 200)
        row = {"part": "step", "variant": name, "batch": b, "k": k, "ms": ms, "peak_gib": gib}
        row["tokens_per_s"] = b / ms * 1e3 if ms == ms else float("nan")
        rows.append(row)
        log(f"step B={b} K={k} {name}: {ms:.3f} ms {gib:.2f} GiB {row['tokens_per_s']:.3g} tok/s")
        torch.cuda.empty_cache()
    if b == max(BATCHES) and k == max(KS):
        rows += time_pieces(m, xs[0], k, log)
    torch.cuda.empty_cache()
    return rows


def time_pieces(m: Model, x, k, log) -> list[dict]:
    """Single stages of the step at the largest shape: where the time goes."""
    w_bf16 = m.w_enc.detach().bfloat16()
    xb = x.bfloat16()
    pre = xb @ w_bf16.T
    for p in m.params:
        p.grad = torch.randn_like(p) * 1e-3
    pieces = {
        "W_enc fp32->bf16 cast": lambda: m.w_enc.detach().bfloat16(),
        "encoder matmul bf16": lambda: xb @ w_bf16.T,
        "torch.topk (B, F) bf16": lambda: pre.topk(k, dim=1),
        "fused Adam step": lambda: m.opt.step(),
    }
    rows = []
    for name, fn in pieces.items():
        ms, _ = bench(fn, 25, 200)
        rows.append({"part": "piece", "variant": name, "batch": x.shape[0], "k": k, "ms": ms})
        log(f"piece {name}: {ms:.3f} ms")
    m.opt.zero_grad(set_to_none=True)
    return rows


TILES = ("16,64,4", "32,64,4", "8,64,2", "16,128,4", "32,32,4", "64,64,8", "16,32,2", "32,128,8")


def tune(gen, log, b=8192, k=128) -> list[dict]:
    """Hierarchical op (fwd+bwd) time per (BLOCK_B, BLOCK_D, warps) tile at one shape."""
    import os

    vals0, idx = random_sparse(b, k, F, "cuda", gen)
    w = (torch.randn(F, D, device="cuda", generator=gen) / D**0.5).requires_grad_()
    bias = torch.zeros(D, device="cuda").requires_grad_()
    x = torch.randn(b, D, device="cuda", generator=gen)
    vals = vals0.requires_grad_()

    def run():
        for p in (vals, w, bias):
            p.grad = None
        kernels.hierarchical_loss(vals, idx, w, bias, x, 1).backward()

    rows = []
    for tile in TILES:
        os.environ["SAE_KERNELS_HIER_TILE"] = tile
        ms, _ = bench(run)
        rows.append({"part": "tune", "variant": f"tile {tile}", "batch": b, "k": k, "ms": ms})
        log(f"tune tile {tile}: {ms:.3f} ms")
    best = min(rows, key=lambda r: r["ms"])["variant"].split()[1]
    os.environ["SAE_KERNELS_HIER_TILE"] = best  # the rest of this run uses the fastest tile
    log(f"tune: using tile {best} (BLOCK_B, BLOCK_D, warps) for the rest of the run")
    return rows


def profile(gen, log, b=8192, k=128) -> None:
    """Kernel-level breakdown (torch.profiler) of our op and our step at one shape."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    m = Model(gen)
    x = torch.randn(b, D, device="cuda", generator=gen)
    vals0, idx = random_sparse(b, k, F, "cuda", gen)
    vals = vals0.requires_grad_()

    def op():
        kernels.hierarchical_loss(vals, idx, m.w_dec, m.b_dec, x, 1).backward()

    def topk_op():
        (kernels.topk_decode(vals, idx, m.w_dec, m.b_dec) - x).square().sum(-1).mean().backward()

    def step():
        ours_loss(m, x, k).backward()
        m.opt.step()
        m.opt.zero_grad(set_to_none=True)

    for name, fn in (("op", op), ("topk op", topk_op), ("step", step)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        table = p.key_averages().table(
            sort_by="cuda_time_total", row_limit=14, max_name_column_width=60
        )
        log(f"profile {name} B={b} K={k} (5 calls)\n{table}")


def run_info() -> dict:
    """What a result file records about its run: source commit, versions, device."""
    import triton

    return {
        "commit": source_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name(),
    }


def start_run(out: Path, name: str):
    """(log, generator): a timestamped logger to stdout and out/name.log, a freshly seeded
    CUDA generator, and the versions and device written first."""

    out.mkdir(parents=True, exist_ok=True)
    logf = (out / f"{name}.log").open("a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    log(" ".join(f"{key} {value}" for key, value in run_info().items()))
    gen = torch.Generator(device="cuda")
    gen.seed()
    return log, gen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="check,op,step")
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument(
        "--step-variants",
        default="ours,ours no adam,ours fwd only,ours encode+topk only (fwd+bwd),naive,compile",
    )
    ap.add_argument("--op-skip", default="", help="comma-separated op variants to leave out")
    args = ap.parse_args()
    log, gen = start_run(args.out, "bench_kernels")
    parts = args.parts.split(",")
    ks = [int(v) for v in args.ks.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    results: dict[str, list] = {}
    if "check" in parts:
        results["check"] = check(gen, log)
    if "tune" in parts:
        results["tune"] = tune(gen, log)
    if "op" in parts:
        results["op"] = [
            r for b in batches for k in ks for r in time_op(b, k, gen, log, args.op_skip.split(","))
        ]
    if "step" in parts:
        variants = args.step_variants.split(",")
        results["step"] = [
            r for b in batches for k in ks for r in time_step(b, k, gen, log, variants)
        ]
    if "profile" in parts:
        profile(gen, log)
    results["run"] = [run_info()]
    (args.out / "bench_kernels.json").write_text(json.dumps(results, indent=1))
    log("summary")
    for part in ("check",):
        for r in results.get(part, []):
            if not r["ok"]:
                log(f"  FAILED {r['check']}")
        if part in results:
            log(f"  checks: {sum(r['ok'] for r in results[part])}/{len(results[part])} ok")
    for part in ("tune", "op", "step"):
        for r in results.get(part, []):
            log(
                f"  {part:5s} B={r['batch']:5d} K={r['k']:3d} {r['variant']:34s} {r['ms']:8.3f} ms"
                f" {r.get('peak_gib', float('nan')):6.2f} GiB"
            )


if __name__ == "__main__":
    main()
