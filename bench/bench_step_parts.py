"""Variants of each stage of the SAE training step, timed side by side in one process.

Where bench_kernels.py times the finished op and step against the baselines, this script
compares ways of doing one stage (the knobs in sae/kernels/triton_ops.py, read at call time):
  ptx:     which global memory / atomic instructions the compiled kernels use (vector width).
  wgrad:   W_enc's gradient by atomics vs the sorted segment reduction over tiles; the sort.
  hier:    the hierarchical op over pipeline depths and tiles (and its no-grad forward).
  topkop:  the TopK op and its decode alone over the sweep kernel's tiles, depths and
           W_dec-gradient variants.
  topk:    torch.topk vs the row top-k kernel (sae/kernels/topk.py) over bf16 rows of F
           columns, per tile; values checked equal to torch.topk's.
  adam:    the trainer's optimiser step — W_dec gradient projection + fused Adam + row
           renormalisation as three PyTorch steps vs DecoderAdam (one Triton pass over W_dec,
           fp32 or bf16 moments); fp32 paths from the same state, checked to agree.
  step:    the full step (bf16 encoder, top-k, hierarchical loss, all backwards, fused Adam)
           with one knob changed at a time.
  variants: the hierarchical op (with and without gradients), the TopK op, its decode and the
           full step under each environment setting of --variants ("A=1+B=2;C=3"; an empty
           entry is the defaults), outputs compared with the first setting's. Run it once per
           code version (PYTHONPATH) to compare versions in one device session.
Shapes: F = 65,536, D = 2304, B = 8192, K = 128 unless --k / --batch say otherwise.

Usage (GPU):  PYTHONPATH=$PWD python bench/bench_step_parts.py --out $OUT [--parts ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import D, F, Model, bench, random_sparse, run_info, start_run

from sae import kernels
from sae.kernels import triton_ops


@contextlib.contextmanager
def env(**values: str):
    """Set environment knobs for the duration of a timing (restored afterwards)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def timed(fn, **knobs: str) -> tuple[float, float]:
    with env(**knobs):
        return bench(fn, 25, 200)


def ptx_summary(log) -> list[dict]:
    """Count the global load/store/atomic instruction forms in every compiled kernel."""
    from sae.kernels import triton_kernels as tk

    rows = []
    for name in ("hierarchical_kernel", "segment_rows_kernel", "sparse_sweep_kernel"):
        fn = getattr(tk, name)
        for caches in getattr(fn, "device_caches", {}).values():
            for key, compiled in caches[0].items():
                ptx = compiled.asm.get("ptx", "")
                ops = Counter(re.findall(r"\b((?:red|atom|ld|st)\.global[.\w]*)", ptx))
                rows.append({"kernel": name, "variant": str(key)[:200], "ops": dict(ops)})
                log(f"ptx {name}: {dict(ops)}")
    return rows


SEG_TILES = ("4,64,1", "2,64,1", "4,32,1", "8,64,1", "4,128,2", "8,64,2", "16,128,4")


def part_wgrad(b, k, gen, log) -> list[dict]:
    xb = torch.randn(b, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(F, D, device="cuda", generator=gen) / D**0.5
    g, idx = random_sparse(b, k, F, "cuda", gen)

    def run():
        return triton_ops.sparse_outer_backward(g, idx, xb, w, True, False, False)

    rows = []
    with env(SAE_KERNELS_WGRAD="atomic"):
        ref, _ = run()
    for tile in SEG_TILES:
        with env(SAE_KERNELS_SEG_TILE=tile):
            got, _ = run()
            err = float((got - ref).norm() / ref.norm())
        ms, _ = timed(run, SAE_KERNELS_SEG_TILE=tile)
        rows.append({"part": "wgrad", "variant": f"segment {tile}", "ms": ms, "rel_err": err})
        log(f"wgrad B={b} K={k} segment {tile}: {ms:.3f} ms (vs atomic rel err {err:.2e})")
    ms, _ = timed(run, SAE_KERNELS_WGRAD="atomic")
    rows.append({"part": "wgrad", "variant": "atomic", "ms": ms})
    log(f"wgrad B={b} K={k} atomic: {ms:.3f} ms")
    ms, _ = timed(lambda: triton_ops.latent_segments(idx, F))
    rows.append({"part": "wgrad", "variant": "latent_segments (sort + bincount)", "ms": ms})
    log(f"wgrad B={b} K={k} latent_segments: {ms:.3f} ms")
    return rows


def op_inputs(b, k, gen):
    """(vals, idx, W, bias, x) of the decoder-side ops at (B, K), vals / W / bias as leaves."""
    vals, idx = random_sparse(b, k, F, "cuda", gen)
    w = (torch.randn(F, D, device="cuda", generator=gen) / D**0.5).requires_grad_()
    bias = (torch.randn(D, device="cuda", generator=gen) * 0.1).requires_grad_()
    x = torch.randn(b, D, device="cuda", generator=gen)
    return vals.requires_grad_(), idx, w, bias, x


def op_calls(vals, idx, w, bias, x) -> dict:
    """The decoder-side ops on fixed inputs: hierarchical op (fwd + bwd, returns the loss), its
    no-grad forward, the TopK op (fwd + bwd) and its decode alone (no grad)."""

    def clear():
        for p in (vals, w, bias):
            p.grad = None

    def hier():
        clear()
        loss = kernels.hierarchical_loss(vals, idx, w, bias, x, 1)
        loss.backward()
        return loss

    def hier_fwd():
        with torch.no_grad():
            kernels.hierarchical_loss(vals, idx, w, bias, x, 1)

    def topkop():
        clear()
        (kernels.topk_decode(vals, idx, w, bias) - x).square().sum(-1).mean().backward()

    def decode():
        with torch.no_grad():
            kernels.topk_decode(vals, idx, w, bias)

    return {"hier": hier, "hier_fwd": hier_fwd, "topkop": topkop, "decode": decode}


def max_rel_diff(outs, refs) -> float:
    """Largest max-abs difference over the pairs, relative to each reference's max-abs."""
    return max(
        ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        for a, r in zip(outs, refs, strict=True)
    )


HIER_VARIANTS = (  # (SAE_KERNELS_STAGES, SAE_KERNELS_HIER_TILE)
    *(("6", t) for t in ("32,32,8", "16,32,4", "64,32,8", "32,64,8", "64,64,8")),
    *((st, "32,32,8") for st in ("2", "4", "8")),
)
FWD_VARIANTS = (("6", "64,64,8"), ("6", "32,32,8"), ("4", "64,64,8"), ("6", "32,64,8"))


def part_hier(b, k, gen, log) -> list[dict]:
    """The hierarchical op over pipeline depths and tiles (with gradients, outputs compared
    with the first variant's), and the no-grad forward over the same knobs."""
    vals, idx, w, bias, x = op_inputs(b, k, gen)
    calls = op_calls(vals, idx, w, bias, x)
    run, fwd = calls["hier"], calls["hier_fwd"]

    rows, first = [], None
    for stages, tile in HIER_VARIANTS:
        knobs = {"SAE_KERNELS_STAGES": stages, "SAE_KERNELS_HIER_TILE": tile}
        with env(**knobs):
            loss = run()
            outs = [loss.detach().clone(), vals.grad.clone(), w.grad.clone(), bias.grad.clone()]
        first = first or outs
        err = max_rel_diff(outs, first)
        del outs
        ms, gib = timed(run, **knobs)
        name = f"stages {stages} tile {tile}"
        rows.append({"part": "hier", "variant": name, "ms": ms, "gib": gib, "err": err})
        log(f"hier B={b} K={k} {name}: {ms:.3f} ms {gib:.2f} GiB max rel diff {err:.2e}")
    for stages, tile in FWD_VARIANTS:
        ms, _ = timed(fwd, SAE_KERNELS_STAGES=stages, SAE_KERNELS_HIER_TILE=tile)
        name = f"no-grad forward stages {stages} tile {tile}"
        rows.append({"part": "hier", "variant": name, "ms": ms})
        log(f"hier B={b} K={k} {name}: {ms:.3f} ms")
    return rows


SPARSE_VARIANTS = (  # the TopK op (decode + dL/dvals by sparse_sweep_kernel) over its knobs
    ("sweep", {}),
    ("sweep, W grad atomic", {"SAE_KERNELS_WGRAD": "atomic"}),
    *(
        (f"sweep, tile {t}", {"SAE_KERNELS_SWEEP_TILE": t})
        for t in ("32,64,8", "64,32,8", "32,32,4")
    ),
    *((f"sweep, stages {st}", {"SAE_KERNELS_STAGES": st}) for st in ("4", "8")),
)


def part_topkop(b, k, gen, log) -> list[dict]:
    """The TopK op (fwd + bwd) and its decode alone (no grad) over the sweep kernel's knobs;
    gradients compared with the first variant's."""
    vals, idx, w, bias, x = op_inputs(b, k, gen)
    calls = op_calls(vals, idx, w, bias, x)
    run, decode = calls["topkop"], calls["decode"]

    rows, first = [], None
    for name, knobs in SPARSE_VARIANTS:
        with env(**knobs):
            run()
            outs = [vals.grad.clone(), w.grad.clone(), bias.grad.clone()]
        first = first or outs
        err = max_rel_diff(outs, first)
        ms, _ = timed(run, **knobs)
        ms_dec, _ = timed(decode, **knobs)
        rows.append({"part": "topkop", "variant": name, "ms": ms, "decode_ms": ms_dec, "err": err})
        log(
            f"topk op B={b} K={k} {name}: {ms:.3f} ms, decode alone {ms_dec:.3f} ms, rel diff {err:.1e}"
        )
    return rows


TOPK_TILES = ("1024,8,4", "1024,4,4", "512,8,4", "1024,8,2", "2048,8,4", "2048,4,4", "1024,16,4")


def part_topk(b, k, gen, log) -> list[dict]:
    from sae.kernels.topk import row_topk

    # Pre-activations as the encoder makes them (bf16 addmm output), one skewed per-latent bias
    # so some latents win far more often than others, as in a trained SAE.
    x = torch.randn(b, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(F, D, device="cuda", generator=gen, dtype=torch.bfloat16) / D**0.5
    bias = (torch.randn(F, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    pre = torch.addmm(bias, x, w.T)
    want = pre.topk(k, dim=1, sorted=True).values
    rows = []
    ms, _ = timed(lambda: pre.topk(k, dim=1, sorted=True))
    rows.append({"part": "topk", "variant": "torch.topk", "batch": b, "k": k, "ms": ms})
    log(f"topk B={b} K={k} torch.topk: {ms:.3f} ms")
    cases = [(f"select {t}", pre, want, t) for t in TOPK_TILES]
    ties = pre.float().mul(4).round().to(torch.bfloat16)  # coarse values: ties at the k-th
    cases.append(("select, coarse ties", ties, ties.topk(k, dim=1, sorted=True).values, None))
    for name, inp, ref, tile in cases:
        knobs = {"SAE_KERNELS_TOPK_TILE": tile} if tile else {}
        with env(**knobs):
            vals, idx = row_topk(inp, k)
        exact = bool(torch.equal(vals, ref) and torch.equal(inp.gather(1, idx), vals))
        ms, _ = timed(lambda inp=inp: row_topk(inp, k), **knobs)
        rows.append({"part": "topk", "variant": name, "batch": b, "k": k, "ms": ms, "exact": exact})
        log(f"topk B={b} K={k} {name}: {ms:.3f} ms exact={exact}")
    return rows


def part_adam(b, k, gen, log) -> list[dict]:
    from sae.train.optim import DecoderAdam

    torch.manual_seed(0)
    w_dec0 = torch.randn(F, D, device="cuda")
    w_dec0 /= w_dec0.norm(dim=1, keepdim=True)
    init = [torch.randn(F, D, device="cuda") / D**0.5, torch.zeros(F, device="cuda"), w_dec0]
    init.append(torch.randn(D, device="cuda") * 0.1)
    grads = [torch.randn(t.shape, device="cuda", generator=gen) * 1e-3 for t in init]

    def model():
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        return params

    def three_step(params):
        opt = torch.optim.Adam(params, lr=1e-5, fused=True)
        w = params[2]

        @torch.no_grad()
        def run():
            w.grad -= (w.grad * w).sum(dim=1, keepdim=True) * w
            opt.step()
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))

        return run

    def fused(params):
        opt = DecoderAdam(params, params[2], 1e-5, fused=True, fused_decoder=True)
        return opt.step

    def fused_bf16(params):
        opt = DecoderAdam(
            params, params[2], 1e-5, fused=True, fused_decoder=True, state_dtype=torch.bfloat16
        )
        return opt.step

    def adam_only(params):
        return torch.optim.Adam(params, lr=1e-5, fused=True).step

    a, c = model(), model()
    run_a, run_c = three_step(a), fused(c)
    for _ in range(3):
        run_a()
        run_c()
    err = float((a[2] - c[2]).detach().norm() / a[2].detach().norm())
    log(f"adam: W_dec after 3 steps, fused vs three-step rel err {err:.2e}")
    rows = [{"part": "adam", "variant": "agreement after 3 steps", "rel_err": err}]
    del a, c, run_a, run_c
    for name, make in (
        ("projection + fused Adam + renormalise (before)", three_step),
        ("DecoderAdam (one pass over W_dec)", fused),
        ("DecoderAdam, bf16 moments (--adam-state bfloat16)", fused_bf16),
        ("fused Adam alone (no projection, no renormalise)", adam_only),
    ):
        params = model()
        ms, gib = timed(make(params))
        rows.append({"part": "adam", "variant": name, "ms": ms, "gib": gib})
        log(f"adam {name}: {ms:.3f} ms {gib:.2f} GiB")
        del params
        torch.cuda.empty_cache()
    return rows


def part_step(b, k, gen, log) -> list[dict]:
    m = Model(gen)
    xs = [torch.randn(b, D, device="cuda", generator=gen) for _ in range(2)]
    state = {"i": 0}

    def step(b_pre=True, adam=True):
        def run():
            x = xs[state["i"] % 2]
            state["i"] += 1
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if b_pre:
                    vals, idx = kernels.topk_encode(x, m.w_enc, m.b_enc, k, b_pre=m.b_dec)
                else:
                    vals, idx = kernels.topk_encode(x - m.b_dec, m.w_enc, m.b_enc, k)
            kernels.hierarchical_loss(vals, idx, m.w_dec, m.b_dec, x, 1).backward()
            if adam:
                m.opt.step()
            m.opt.zero_grad(set_to_none=True)

        return run

    step()()  # Adam state
    variants = {
        "ours": (step(), {}),
        "ours, x - b_dec (no b_pre)": (step(b_pre=False), {}),
        "ours, W_enc grad by atomics": (step(), {"SAE_KERNELS_WGRAD": "atomic"}),
        "ours, hier tile 64,64,8": (step(), {"SAE_KERNELS_HIER_TILE": "64,64,8"}),
        "ours, torch.topk (before)": (step(), {"SAE_KERNELS_TOPK": "torch"}),
        "ours, no Adam": (step(adam=False), {}),
    }
    rows = []
    for name, (fn, knobs) in variants.items():
        ms, gib = timed(fn, **knobs)
        rows.append({"part": "step", "variant": name, "batch": b, "k": k, "ms": ms, "gib": gib})
        log(f"step B={b} K={k} {name}: {ms:.3f} ms {gib:.2f} GiB")
    return rows


def parse_variants(spec: str) -> list[dict[str, str]]:
    """ "A=1+B=2;C=3" -> [{"A": "1", "B": "2"}, {"C": "3"}]; an empty entry is the defaults."""
    out = []
    for entry in spec.split(";"):
        pairs = [p for p in entry.split("+") if p.strip()]
        out.append(dict(p.strip().split("=", 1) for p in pairs))
    return out


def _variant_ops(b, k, gen, log, settings) -> list[dict]:
    """The decoder-side ops under each setting (their inputs are freed on return)."""
    vals, idx, w, bias, x = op_inputs(b, k, gen)
    calls = op_calls(vals, idx, w, bias, x)
    rows, first = [], None
    for knobs in settings:
        name = "+".join(f"{a}={v}" for a, v in knobs.items()) or "defaults"
        with env(**knobs):
            loss = calls["hier"]()
            outs = [loss.detach().clone(), vals.grad.clone(), w.grad.clone(), bias.grad.clone()]
            calls["topkop"]()
            outs += [vals.grad.clone(), w.grad.clone()]
        first = first or outs
        row = {"part": "variants", "variant": name, "err": max_rel_diff(outs, first)}
        del outs
        for label, fn in calls.items():
            row[f"{label}_ms"] = timed(fn, **knobs)[0]
        rows.append(row)
        log(
            f"variants B={b} K={k} {name}: "
            + ", ".join(f"{a} {v:.3g}" for a, v in row.items() if a not in ("part", "variant"))
        )
    return rows


def part_variants(b, k, gen, log, settings) -> list[dict]:
    rows = _variant_ops(b, k, gen, log, settings)
    torch.cuda.empty_cache()
    m = Model(gen)
    xs = [torch.randn(b, D, device="cuda", generator=gen) for _ in range(2)]
    state = {"i": 0}

    def step():
        xb = xs[state["i"] % 2]
        state["i"] += 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v, i = kernels.topk_encode(xb, m.w_enc, m.b_enc, k, b_pre=m.b_dec)
        kernels.hierarchical_loss(v, i, m.w_dec, m.b_dec, xb, 1).backward()
        m.opt.step()
        m.opt.zero_grad(set_to_none=True)

    step()  # Adam state
    for knobs, row in zip(settings, rows, strict=True):
        row["step_ms"], row["step_gib"] = timed(step, **knobs)
        log(
            f"variants B={b} K={k} {row['variant']}: step {row['step_ms']:.3f} ms {row['step_gib']:.2f} GiB"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="wgrad,hier,step,ptx")
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--variants", default="", help='settings for the variants part: "A=1+B=2;C=3"')
    args = ap.parse_args()
    log, gen = start_run(args.out, "bench_step_parts")
    parts = {
        "wgrad": part_wgrad,
        "hier": part_hier,
        "topkop": part_topkop,
        "topk": part_topk,
        "adam": part_adam,
        "step": part_step,
    }
    results: dict[str, list] = {}
    for name in args.parts.split(","):
        if name == "ptx":
            results["ptx"] = ptx_summary(log)
        elif name == "variants":
            settings = parse_variants(args.variants)
            results[name] = part_variants(args.batch, args.k, gen, log, settings)
        else:
            results[name] = parts[name](args.batch, args.k, gen, log)
        torch.cuda.empty_cache()
    results["run"] = [run_info()]
    (args.out / "bench_step_parts.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
