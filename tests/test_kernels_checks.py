"""The kernel ops' argument checks, knobs and backend choice, and the row kernels' 64-bit offsets.

Checks run on both paths (the reference and the Triton one, here in the interpreter), so CPU
and GPU refuse the same calls with the same messages.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import triton

from sae import kernels

B, D, F, K = 4, 16, 20, 5


@pytest.fixture
def ops() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "vals": torch.rand(B, K, generator=g) + 0.1,
        "idx": torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(B)]),
        "w": torch.randn(F, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
        "b_enc": torch.randn(F, generator=g),
        "x": torch.randn(B, D, generator=g),
    }


def _calls(t: dict[str, torch.Tensor], backend: str, bad: dict[str, torch.Tensor]):
    """Every op once, with the arguments in `bad` replacing the good ones."""
    a = {**t, **bad}
    return {
        "topk_decode": lambda: kernels.topk_decode(
            a["vals"], a["idx"], a["w"], a["b_dec"], backend=backend
        ),
        "hierarchical_loss": lambda: kernels.hierarchical_loss(
            a["vals"], a["idx"], a["w"], a["b_dec"], a["x"], backend=backend
        ),
        "topk_encode": lambda: kernels.topk_encode(
            a["x"], a["w"], a["b_enc"], K, b_pre=a["b_dec"], backend=backend
        ),
        "encode_selected": lambda: kernels.encode_selected(
            a["x"], a["w"], a["b_enc"], a["vals"], a["idx"], b_pre=a["b_dec"], backend=backend
        ),
    }


# (replaced argument, its bad value, ops that take it, message)
BAD_SHAPES = [
    ("x", torch.zeros(1, D), ("hierarchical_loss", "encode_selected"), r"x must be \(B, D\) with B = 4, D = 16, got \(1, 16\)"),
    ("x", torch.zeros(B, D - 3), ("hierarchical_loss",), r"x must be \(B, D\) with B = 4, D = 16, got \(4, 13\)"),
    ("x", torch.zeros(B, D - 3), ("topk_encode",), r"x must be \(B, D\) with D = 16, got \(4, 13\)"),
    ("x", torch.zeros(D), ("topk_encode",), r"x must be \(B, D\) with D = 16, got \(16,\)"),
    ("b_dec", torch.zeros(D - 3), ("topk_decode", "hierarchical_loss"), r"b_dec must be \(D,\) with D = 16, got \(13,\)"),
    ("b_dec", torch.zeros(1, D), ("topk_encode", "encode_selected"), r"b_pre must be \(D,\) with D = 16, got \(1, 16\)"),
    ("b_enc", torch.zeros(F + 1), ("topk_encode", "encode_selected"), r"b_enc must be \(F,\) with F = 20, got \(21,\)"),
    ("w", torch.zeros(F * D), ("topk_decode",), r"W_dec must be \(F, D\), got \(320,\)"),
    ("w", torch.zeros(F * D), ("encode_selected",), r"W_enc must be \(F, D\), got \(320,\)"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("name", "value", "ops_taking", "message"), BAD_SHAPES)
def test_shapes_are_checked_with_the_same_message_on_both_paths(
    backend, name, value, ops_taking, message, ops
):
    calls = _calls(ops, backend, {name: value})
    for op in ops_taking:
        with pytest.raises(ValueError, match=message):
            calls[op]()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_devices_are_checked(backend, ops):
    """A tensor on another device (meta here: a second device every machine has)."""
    for name, shown in (("b_dec", "b_dec"), ("w", "W_dec"), ("x", "x")):
        calls = _calls(ops, backend, {name: ops[name].to("meta")})
        with pytest.raises(ValueError, match=f"{shown} is on meta but vals on cpu"):
            calls["hierarchical_loss"]()
    calls = _calls(ops, backend, {"b_enc": ops["b_enc"].to("meta")})
    with pytest.raises(ValueError, match="b_enc is on meta but x on cpu: all must be on one"):
        calls["topk_encode"]()


def test_empty_backend_variable_is_auto_and_cpu_triton_needs_the_interpreter(ops, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS", "")
    assert not kernels.uses_triton(ops["x"])
    kernels.topk_decode(ops["vals"], ops["idx"], ops["w"], ops["b_dec"])
    monkeypatch.delenv("TRITON_INTERPRET")
    message = "the Triton kernels need CUDA tensors, got a cpu tensor: .* set TRITON_INTERPRET=1"
    with pytest.raises(RuntimeError, match=message):
        kernels.topk_decode(ops["vals"], ops["idx"], ops["w"], ops["b_dec"], backend="triton")
    monkeypatch.setenv("SAE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match=message):
        kernels.uses_triton(ops["x"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.uses_triton(ops["x"])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("48,64,4", "a must be a power of two, got '48,64,4'"),
        ("0,64,4", "a must be a power of two, got '0,64,4'"),
        ("64,-16,4", "b must be a power of two, got '64,-16,4'"),
        ("64,64,3", "warps must be one of 1, 2, 4, 8, 16, got '64,64,3'"),
        ("64,64,32", "warps must be one of 1, 2, 4, 8, 16, got '64,64,32'"),
    ],
)
def test_tile_knobs_refuse_sizes_triton_cannot_take(value, message, ops, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS_SWEEP_TILE", value)
    with pytest.raises(
        ValueError, match=re.escape('SAE_KERNELS_SWEEP_TILE="a,b,warps": ' + message)
    ):
        kernels.topk_decode(ops["vals"], ops["idx"], ops["w"], ops["b_dec"], backend="triton")
    monkeypatch.setenv("SAE_KERNELS_SWEEP_TILE", "16,32,2")  # a valid override runs
    kernels.topk_decode(ops["vals"], ops["idx"], ops["w"], ops["b_dec"], backend="triton")


# Compiles the row kernels to TTIR for an H100 without a GPU (in a process without the
# interpreter, which would replace the kernels) as deterministic and atomic launches would, with
# int32 row offsets (K·B and W under 2^31 elements) and int64 ones (either past it), every
# integer argument typed i32 as Triton types those below 2^31.
_TTIR_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sae.kernels.triton_kernels import hierarchical_kernel, sparse_sweep_kernel

def ttir(kernel, offsets, consts):
    def kind(name):
        if name == "off_ptr":
            return offsets
        return "*fp32" if name.endswith("_ptr") else "fp32" if name == "gw_scale" else "i32"
    sig = {p.name: "constexpr" if p.name in consts else kind(p.name) for p in kernel.params}
    src = ASTSource(kernel, sig, constexprs=consts)
    target = GPUTarget("cuda", 90, 32)
    return triton.compile(src, target=target, options={"num_warps": 4}).asm["ttir"]

loop = dict(K=8, EVEN_D=False, ALIGN=4, STAGES=2, UNROLL=1, BLOCK_B=16, BLOCK_D=32)
for offsets in ("*i32", "*i64"):
    for atomic in (False, True):
        print("### hier", offsets, atomic)
        print(ttir(hierarchical_kernel, offsets, dict(
            WANT_GRAD=True, GW_MODE=1 if atomic else 2, GV_ATOMIC=atomic, **loop)))
        print("### sweep", offsets, atomic)
        print(ttir(sparse_sweep_kernel, offsets, dict(
            DECODE=not atomic, HAS_BIAS=False, DOT=True, DOT_ATOMIC=atomic, SCATTER=atomic,
            **loop)))
"""


def _i32_products(ttir: str, args: tuple[str, ...]) -> list[str]:
    """TTIR multiplies in i32 that take one of the arguments `args` directly."""
    pattern = r"%(" + "|".join(args) + r")\b"
    return [
        line.strip()
        for line in ttir.splitlines()
        if "arith.muli" in line
        and re.search(pattern, line)
        and line.split(" loc(")[0].endswith("i32")
    ]


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="no NVIDIA Triton backend")
def test_row_kernels_offsets_are_64_bit_where_they_can_pass_2_to_the_31(tmp_path):
    """dL/dvals and dots partials are (chunks, K, B) buffers that pass 2^31 elements before any
    one tensor argument does (B = 131072, K = 128, 72 chunks of D = 2304): a chunk times its
    stride (i32 arguments) must be multiplied in i64 always; step i times B too where K·B may
    pass 2^31 (int64 row offsets), else the loops keep the cheaper i32 multiply. The
    interpreter's numpy int64 arithmetic cannot show a wrap, so this reads the compiled TTIR."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run(
        [sys.executable, "-c", _TTIR_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    variants = run.stdout.split("### ")[1:]
    assert len(variants) == 8
    strides = ("stride_gv_chunk", "stride_dots_chunk")
    for variant in variants:
        name, ttir = variant.split("\n", 1)
        wide = "*i64" in name
        args = (*strides, "B") if wide else strides
        assert not _i32_products(ttir, args), (name, _i32_products(ttir, args))
        if wide:
            assert "arith.extsi %B : i32 to i64" in ttir, name
        if "False" in name:  # per-chunk partials: the chunk stride is used, widened
            stride = strides[0] if name.startswith("hier") else strides[1]
            assert f"arith.extsi %{stride} : i32 to i64" in ttir, name
