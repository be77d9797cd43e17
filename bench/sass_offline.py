"""Compile the row kernels for an H100 (sm_90) without a GPU and count what their loops issue.

Triton compiles to PTX and the bundled ptxas assembles it on any machine, so the instruction mix
of a kernel's inner loops (memory ops, shuffles, barriers, address arithmetic) can be compared
between versions before spending device time. Counts are per loop iteration and per warp; the
"per element" column divides by the tile's elements over the warps (warp-instructions per
element of B·K·D), which bounds the kernel's issue time: elements × that / (SMs × 4 × clock).

Integer arguments are specialised the way Triton does at launch (divisible by 16, every = 1,
d_start = 0), so the SASS matches what a benchmark run compiles.

Usage:  [SAE_KERNELS_UNROLL=n] python bench/sass_offline.py [--kernel hier|sweep] BB,BD,WARPS,STAGES[,GRAD] ...
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sae.kernels.triton_kernels import hierarchical_kernel, sparse_sweep_kernel

TARGET = GPUTarget("cuda", 90, 32)
NV_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
K = 128


def _signature(names_types: list[tuple[str, str]], consts: dict):
    sig = dict(names_types)
    sig.update({name: "constexpr" for name in consts})
    # Pointers and strides divisible by 16, as Triton specialises them at launch.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, ty) in enumerate(names_types)
        if ty.startswith("*") or name.startswith("stride") or name == "B"
    }
    return sig, attrs


def _loop_consts(stages: int, bb: int, bd: int) -> dict:
    """The sweep loop's constexprs shared by both row kernels."""
    unroll = int(os.environ.get("SAE_KERNELS_UNROLL", "1"))
    return dict(EVEN_D=True, ALIGN=16, STAGES=stages, UNROLL=unroll, BLOCK_B=bb, BLOCK_D=bd)


def compile_hier(bb: int, bd: int, warps: int, stages: int, grad: bool):
    names_types = [
        *((n, "*fp32") for n in ("loss_part_ptr", "gv_ptr", "gr_ptr", "gw_ptr", "vals_ptr")),
        ("off_ptr", "*i32"),
        *((n, "*fp32") for n in ("w_ptr", "bdec_ptr", "x_ptr")),
        ("B", "i32"),
        ("d_end", "i32"),
        ("gw_scale", "fp32"),
        *((n, "i32") for n in ("stride_x", "stride_gv_chunk", "stride_gr", "stride_gw_item")),
    ]
    consts = dict(
        every=1,
        d_start=0,
        K=K,
        WANT_GRAD=grad,
        GW_MODE=1 if grad else 0,
        GV_ATOMIC=True,
        **_loop_consts(stages, bb, bd),
    )
    sig, attrs = _signature(names_types, consts)
    src = ASTSource(hierarchical_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def compile_sweep(bb: int, bd: int, warps: int, stages: int, grad: bool):
    """The TopK op's dots sweep (grad) or its decode (no grad)."""
    ptrs = ("out_ptr", "dots_ptr", "gw_ptr", "vals_ptr")
    names_types = [
        *((n, "*fp32") for n in ptrs),
        ("off_ptr", "*i32"),
        *((n, "*fp32") for n in ("w_ptr", "bias_ptr", "vec_ptr")),
        ("B", "i32"),
        ("D", "i32"),
        *((n, "i32") for n in ("stride_o", "stride_vec", "stride_dots_chunk")),
    ]
    consts = dict(
        K=K,
        DECODE=not grad,
        HAS_BIAS=not grad,
        DOT=grad,
        DOT_ATOMIC=True,
        SCATTER=False,
        **_loop_consts(stages, bb, bd),
    )
    sig, attrs = _signature(names_types, consts)
    src = ASTSource(sparse_sweep_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def _run(tool: str, data: bytes, suffix: str, *args: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        f.write(data)
    try:
        out = subprocess.run([os.path.join(NV_BIN, tool), *args, f.name], capture_output=True)
    finally:
        os.unlink(f.name)
    return (out.stdout + out.stderr).decode()


def loop_mixes(sass: str) -> list[collections.Counter]:
    """Opcode counts of every loop body (a backward branch and its target)."""
    instrs, label_at, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                label_at[name] = addr
            pending = []
            instrs.append((addr, re.sub(r"^@!?U?P\w+\s+", "", m.group(2))))
    loops = []
    for addr, text in instrs:
        target = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", text)
        if target and label_at.get(target.group(1), addr) < addr:
            start = label_at[target.group(1)]
            loops.append(
                collections.Counter(
                    t.split()[0].split(".")[0] for a, t in instrs if start <= a <= addr
                )
            )
    return loops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kernel", choices=("hier", "sweep"), default="hier")
    ap.add_argument("tiles", nargs="+", help="BB,BD,WARPS,STAGES[,GRAD 0|1]")
    args = ap.parse_args()
    build = compile_hier if args.kernel == "hier" else compile_sweep
    for spec in args.tiles:
        bb, bd, warps, stages, *grad = (int(v) for v in spec.split(","))
        ck = build(bb, bd, warps, stages, bool(grad[0]) if grad else True)
        usage = _run(
            "ptxas", ck.asm["ptx"].encode(), ".ptx", "-v", "--gpu-name=sm_90a", "-o", "/dev/null"
        )
        regs = re.search(r"Used (\d+) registers", usage)
        spills = re.search(r"(\d+) bytes spill stores", usage)
        print(
            f"{args.kernel} {spec}: {regs.group(1) if regs else '?'} registers, "
            f"{spills.group(1) if spills else '?'} B spilled, {ck.metadata.shared} B shared"
        )
        sass = _run("nvdisasm", ck.asm["cubin"], ".cubin", "-c")
        for n, mix in enumerate(loop_mixes(sass)):
            total = sum(mix.values())
            per_el = total * warps / (bb * bd)
            top = ", ".join(f"{op} {c}" for op, c in mix.most_common(10))
            print(f"  loop {n}: {total} instr/iteration, {per_el:.2f} warp-instr/element; {top}")


if __name__ == "__main__":
    main()
