"""Triton kernels (run by the interpreter on CPU) against the float64 PyTorch reference.

Every case draws fresh random inputs, uses odd D, K not a power of two and a batch that is not a
multiple of anything, and poisons kernel outputs with NaN (SAE_KERNELS_POISON) so an element a
kernel forgot to write fails instead of passing as a stale zero.
"""

from __future__ import annotations

import pytest
import torch

from sae import kernels
from sae.kernels import reference
from sae.kernels.triton_ops import POISON_ENV

TOL = 1e-5

# (B, D, F, K): several D-chunks with a ragged last one; K up to 200 (tile 256 x 32).
SHAPES = [(7, 150, 64, 13), (5, 37, 300, 40), (3, 70, 400, 200)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().double()
    ref = ref.detach().double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float((a - ref).norm() / ref.norm())


def sparse_inputs(b: int, d: int, f: int, k: int, gen: torch.Generator):
    vals = torch.rand(b, k, generator=gen).sort(dim=1, descending=True).values + 0.05
    idx = torch.stack([torch.randperm(f, generator=gen)[:k] for _ in range(b)])
    w = torch.randn(f, d, generator=gen) / d**0.5
    bias = torch.randn(d, generator=gen) * 0.1
    x = torch.randn(b, d, generator=gen)
    return vals, idx, w, bias, x


def leaves(*ts: torch.Tensor, dtype=None) -> list[torch.Tensor]:
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in ts]


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.seed()  # fresh inputs on every run
    return g


# The K=200 shape runs deterministic mode once (every=K): the interpreter is slow there.
HIER_CASES = [
    (shape, every_kind, det)
    for shape in SHAPES
    for every_kind in ("1", "8", "K")
    for det in (False, True)
    if not (det and shape[3] > 100 and every_kind != "K")
]


@pytest.mark.parametrize(("shape", "every_kind", "deterministic"), HIER_CASES)
def test_hierarchical_loss_matches_float64_reference(shape, every_kind, deterministic, gen):
    b, d, f, k = shape
    every = {"1": 1, "8": 8, "K": k}[every_kind]
    vals, idx, w, bias, x = sparse_inputs(b, d, f, k, gen)
    ours = leaves(vals, w, bias, x)
    loss = kernels.hierarchical_loss(
        ours[0],
        idx,
        ours[1],
        ours[2],
        ours[3],
        every,
        backend="triton",
        deterministic=deterministic,
    )
    (loss * 1.7).backward()  # a non-unit incoming gradient
    ref = leaves(vals, w, bias, x, dtype=torch.float64)
    ref_loss = reference.hierarchical_loss(ref[0], idx, ref[1], ref[2], ref[3], every)
    (ref_loss * 1.7).backward()
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) < TOL
    for name, a, r in zip(("vals", "W_dec", "b_dec", "x"), ours, ref, strict=True):
        assert rel_err(a.grad, r.grad) < TOL, name


@pytest.mark.parametrize("deterministic", [False, True])
def test_hierarchical_loss_when_d_is_a_multiple_of_the_tile(deterministic, gen):
    """D = 128: no ragged D-chunk, the kernel's column-mask-free path."""
    vals, idx, w, bias, x = sparse_inputs(9, 128, 50, 7, gen)
    ours = leaves(vals, w, bias, x)
    loss = kernels.hierarchical_loss(
        ours[0], idx, ours[1], ours[2], ours[3], 2, backend="triton", deterministic=deterministic
    )
    loss.backward()
    ref = leaves(vals, w, bias, x, dtype=torch.float64)
    ref_loss = reference.hierarchical_loss(ref[0], idx, ref[1], ref[2], ref[3], 2)
    ref_loss.backward()
    assert rel_err(loss, ref_loss) < TOL
    for name, a, r in zip(("vals", "W_dec", "b_dec", "x"), ours, ref, strict=True):
        assert rel_err(a.grad, r.grad) < TOL, name


def test_row_kernels_with_int64_row_offsets(gen, monkeypatch):
    """Dictionaries of 2^31 elements or more get int64 row offsets: the same kernels, checked
    here by lowering the threshold (a real one would not fit in a test)."""
    from sae.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "INT32_OFFSETS_BELOW", 0)
    assert triton_ops._step_major(*sparse_inputs(2, 8, 5, 3, gen)[:3])[1].dtype == torch.int64
    vals, idx, w, bias, x = sparse_inputs(5, 37, 40, 6, gen)
    ours = leaves(vals, w, bias, x)
    loss = kernels.hierarchical_loss(ours[0], idx, ours[1], ours[2], ours[3], 2, backend="triton")
    recon = kernels.topk_decode(ours[0], idx, ours[1], ours[2], backend="triton")
    (loss + recon.square().mean()).backward()
    ref = leaves(vals, w, bias, x, dtype=torch.float64)
    ref_loss = reference.hierarchical_loss(ref[0], idx, ref[1], ref[2], ref[3], 2)
    ref_recon = reference.topk_decode(ref[0], idx, ref[1], ref[2])
    (ref_loss + ref_recon.square().mean()).backward()
    assert rel_err(loss, ref_loss) < TOL
    for name, a, r in zip(("vals", "W_dec", "b_dec", "x"), ours, ref, strict=True):
        assert rel_err(a.grad, r.grad) < TOL, name


def test_hierarchical_loss_bf16_activations_and_partial_grads(gen):
    b, d, f, k = 9, 75, 128, 24
    vals, idx, w, bias, x = sparse_inputs(b, d, f, k, gen)
    vals, x = vals.bfloat16(), x.bfloat16()
    v_, w_ = leaves(vals, w)
    loss = kernels.hierarchical_loss(v_, idx, w_, bias, x, 8, backend="triton")
    loss.backward()
    ref = leaves(vals, w, dtype=torch.float64)
    ref_loss = reference.hierarchical_loss(ref[0], idx, ref[1], bias.double(), x.double(), 8)
    ref_loss.backward()
    assert rel_err(loss, ref_loss) < TOL
    assert v_.grad.dtype == torch.bfloat16
    assert rel_err(v_.grad, ref[0].grad) < 1e-2  # rounded to bf16 on output
    assert rel_err(w_.grad, ref[1].grad) < TOL


def test_hierarchical_loss_without_grad_matches_reference(gen):
    vals, idx, w, bias, x = sparse_inputs(6, 41, 90, 11, gen)
    with torch.no_grad():
        loss = kernels.hierarchical_loss(vals, idx, w, bias, x, 4, backend="triton")
    ref = reference.hierarchical_loss(vals.double(), idx, w.double(), bias.double(), x.double(), 4)
    assert rel_err(loss, ref) < TOL


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("deterministic", [False, True])
def test_topk_decode_matches_float64_reference(shape, deterministic, gen):
    b, d, f, k = shape
    vals, idx, w, bias, _ = sparse_inputs(b, d, f, k, gen)
    grad_out = torch.randn(b, d, generator=gen)
    ours = leaves(vals, w, bias)
    out = kernels.topk_decode(
        ours[0], idx, ours[1], ours[2], backend="triton", deterministic=deterministic
    )
    out.backward(grad_out)
    ref = leaves(vals, w, bias, dtype=torch.float64)
    ref_out = reference.topk_decode(ref[0], idx, ref[1], ref[2])
    ref_out.backward(grad_out.double())
    assert rel_err(out, ref_out) < TOL
    for name, a, r in zip(("vals", "W_dec", "b_dec"), ours, ref, strict=True):
        assert rel_err(a.grad, r.grad) < TOL, name


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("deterministic", [False, True])
def test_topk_encode_sparse_backward_matches_float64_reference(shape, deterministic, gen):
    b, d, f, k = shape
    x = torch.randn(b, d, generator=gen)
    w_enc = torch.randn(f, d, generator=gen) / d**0.5
    b_enc = torch.randn(f, generator=gen) * 0.1
    weights = torch.randn(b, k, generator=gen)
    ours = leaves(x, w_enc, b_enc)
    vals, idx = kernels.topk_encode(*ours, k, backend="triton", deterministic=deterministic)
    (vals * weights).sum().backward()
    ref = leaves(x, w_enc, b_enc, dtype=torch.float64)
    ref_vals, ref_idx = reference.topk_encode(*ref, k)
    (ref_vals * weights.double()).sum().backward()
    assert torch.equal(idx, ref_idx)
    assert rel_err(vals, ref_vals) < TOL
    for name, a, r in zip(("x", "W_enc", "b_enc"), ours, ref, strict=True):
        assert rel_err(a.grad, r.grad) < TOL, name


@pytest.mark.parametrize("deterministic", [False, True])
def test_topk_encode_b_pre_gradient_matches_reference(deterministic, gen):
    b, d, f, k = 6, 45, 120, 10
    x = torch.randn(b, d, generator=gen)  # data: no gradient, so b_pre's comes from db_enc
    w_enc = torch.randn(f, d, generator=gen) / d**0.5
    b_enc = torch.randn(f, generator=gen) * 0.1
    b_pre = torch.randn(d, generator=gen) * 0.1
    weights = torch.randn(b, k, generator=gen)
    ours = leaves(w_enc, b_enc, b_pre)
    vals, idx = kernels.topk_encode(
        x, ours[0], ours[1], k, b_pre=ours[2], backend="triton", deterministic=deterministic
    )
    (vals * weights).sum().backward()
    ref = leaves(w_enc, b_enc, b_pre, dtype=torch.float64)
    ref_vals, ref_idx = reference.topk_encode(x.double() - ref[2], ref[0], ref[1], k)
    (ref_vals * weights.double()).sum().backward()
    assert torch.equal(idx, ref_idx)
    assert rel_err(vals, ref_vals) < TOL
    for name, a, r in zip(("W_enc", "b_enc", "b_pre"), ours, ref, strict=True):
        assert rel_err(a.grad, r.grad) < TOL, name


@pytest.mark.parametrize("deterministic", [False, True])
def test_encode_selected_gradients_match_float64_reference(deterministic, gen):
    """BatchTopK's encoder: candidates selected without gradient, cut to a narrower width and
    masked, then made differentiable; gradients of W_enc, b_enc and b_pre vs float64, and the
    selected values' own gradient passed through as on the reference."""
    b, d, f, k = 7, 37, 300, 13
    x = torch.randn(b, d, generator=gen)
    w_enc = torch.randn(f, d, generator=gen) / d**0.5
    b_enc = torch.randn(f, generator=gen) * 0.1
    b_pre = torch.randn(d, generator=gen) * 0.1
    with torch.no_grad():
        cand, idx = kernels.topk_encode(x, w_enc, b_enc, k, b_pre=b_pre, backend="triton")
    cand, idx = cand[:, :9], idx[:, :9]
    keep = cand >= cand.flatten().kthvalue(cand.numel() - 40).values  # 40 kept over the batch
    weights = torch.randn(b, 9, generator=gen)
    det = {"deterministic": deterministic}
    ours = leaves(w_enc, b_enc, b_pre, cand)
    vals = kernels.encode_selected(
        x, ours[0], ours[1], ours[3], idx, b_pre=ours[2], backend="triton", **det
    )
    assert torch.equal(vals, cand)
    (vals * keep * weights).sum().backward()
    ref = leaves(w_enc, b_enc, b_pre, cand, dtype=torch.float64)
    ref_vals = kernels.encode_selected(
        x.double(), ref[0], ref[1], ref[3], idx, b_pre=ref[2], backend="torch"
    )
    (ref_vals * keep * weights.double()).sum().backward()
    for name, a, r in zip(("W_enc", "b_enc", "b_pre", "vals"), ours, ref, strict=True):
        assert rel_err(a.grad, r.grad) < TOL, name


@pytest.mark.parametrize("wgrad", ["segment", "atomic"])
def test_topk_encode_under_bf16_autocast_takes_w_enc_gradient_from_bf16_x(wgrad, gen, monkeypatch):
    """Under autocast the matmul reads bf16(x − b_pre); W_enc's gradient is the exact gradient
    of that product, Σ g · bf16(x) per latent, not one taken from the fp32 x (which differs
    at ~1e-3, so this bound tells the two apart). dx keeps x's dtype."""
    monkeypatch.setenv("SAE_KERNELS_WGRAD", wgrad)
    b, d, f, k = 9, 70, 150, 12
    x = torch.randn(b, d, generator=gen)
    w_enc = torch.randn(f, d, generator=gen) / d**0.5
    b_enc = torch.randn(f, generator=gen) * 0.1
    b_pre = torch.randn(d, generator=gen) * 0.1
    weights = torch.randn(b, k, generator=gen)
    ours = leaves(x, w_enc, b_enc, b_pre)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vals, idx = kernels.topk_encode(ours[0], *ours[1:3], k, b_pre=ours[3], backend="triton")
    assert vals.dtype == torch.bfloat16
    (vals.float() * weights).sum().backward()
    # vals are bf16, so the gradient reaching them is bf16 too
    g = (weights.to(torch.bfloat16).double() * (vals.detach() > 0)).double()
    x_mm = (x - b_pre).to(torch.bfloat16).double()
    ref_w = torch.zeros(f, d, dtype=torch.float64)
    ref_w.index_add_(0, idx.reshape(-1), (g[:, :, None] * x_mm[:, None, :]).reshape(-1, d))
    assert rel_err(ours[1].grad, ref_w) < TOL
    x_fp32 = (x - b_pre).double()
    fp32_w = torch.zeros(f, d, dtype=torch.float64)
    fp32_w.index_add_(0, idx.reshape(-1), (g[:, :, None] * x_fp32[:, None, :]).reshape(-1, d))
    assert rel_err(fp32_w, ref_w) > 1e-4  # the bound above does tell the two apart
    ref_x = torch.zeros(b, d, dtype=torch.float64)
    for j in range(k):
        ref_x += g[:, j, None] * w_enc.double()[idx[:, j]]
    assert ours[0].grad.dtype == torch.float32
    assert rel_err(ours[0].grad, ref_x) < TOL
    assert rel_err(ours[3].grad, -ref_x.sum(0)) < TOL


@pytest.mark.parametrize(
    ("wgrad", "gv", "seg"),
    [
        ("atomic", "buffer", "latent"),
        ("segment", "atomic", "latent"),
        ("segment", "atomic", "chunk"),
    ],
)
def test_accumulation_variants_match_float64_reference(wgrad, gv, seg, gen, monkeypatch):
    """Both ways of accumulating W's gradient rows and dL/dvals (the benchmark's knobs).

    40 rows x 5 of 6 latents: every latent's segment spans several BLOCK_P item blocks.
    """
    monkeypatch.setenv("SAE_KERNELS_WGRAD", wgrad)
    b, d, f, k = 40, 37, 6, 5
    vals, idx, w, bias, x = sparse_inputs(b, d, f, k, gen)
    ours = leaves(vals, w, bias, x)
    loss = kernels.hierarchical_loss(ours[0], idx, ours[1], ours[2], ours[3], backend="triton")
    recon = kernels.topk_decode(ours[0], idx, ours[1], ours[2], backend="triton")
    enc_vals, _ = kernels.topk_encode(ours[3], ours[1], ours[2][:1].expand(f), k, backend="triton")
    (loss + recon.square().mean() + enc_vals.sum()).backward()
    ref = leaves(vals, w, bias, x, dtype=torch.float64)
    ref_loss = reference.hierarchical_loss(ref[0], idx, ref[1], ref[2], ref[3], 1)
    ref_recon = reference.topk_decode(ref[0], idx, ref[1], ref[2])
    ref_enc, _ = reference.topk_encode(ref[3], ref[1], ref[2][:1].expand(f), k)
    (ref_loss + ref_recon.square().mean() + ref_enc.sum()).backward()
    assert rel_err(loss, ref_loss) < TOL
    for name, a, r in zip(("vals", "W", "bias", "x"), ours, ref, strict=True):
        assert rel_err(a.grad, r.grad) < TOL, name


def test_accumulation_knob_rejects_unknown_value(gen, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS_WGRAD", "fast")
    vals, idx, w, bias, _ = sparse_inputs(3, 16, 8, 2, gen)
    w.requires_grad_()
    with pytest.raises(ValueError, match="SAE_KERNELS_WGRAD must be one of segment, atomic"):
        kernels.topk_decode(vals, idx, w, bias, backend="triton").sum().backward()
    monkeypatch.delenv("SAE_KERNELS_WGRAD")
    monkeypatch.setenv("SAE_KERNELS_SEG_TILE", "8,64")
    with pytest.raises(ValueError, match='SAE_KERNELS_SEG_TILE must be three integers "a,b,warps"'):
        kernels.topk_decode(vals, idx, w, bias, backend="triton").sum().backward()
    for knob in ("SAE_KERNELS_STAGES", "SAE_KERNELS_UNROLL"):
        for bad in ("0", "six"):
            monkeypatch.setenv(knob, bad)
            with pytest.raises(
                ValueError, match=f"{knob} must be an integer of at least 1, got '{bad}'"
            ):
                kernels.hierarchical_loss(vals, idx, w, bias, torch.zeros(3, 16), backend="triton")
        monkeypatch.delenv(knob)


def test_deterministic_mode_repeats_bitwise(gen):
    b, d, f, k = 11, 53, 20, 12  # few latents: many collisions in the scatter-adds
    vals, idx, w, bias, x = sparse_inputs(b, d, f, k, gen)
    w_enc = torch.randn(f, d, generator=gen)

    def run() -> list[torch.Tensor]:
        ps = leaves(vals, w, bias, x, w_enc, bias.new_zeros(f))
        enc_vals, enc_idx = kernels.topk_encode(
            ps[3], ps[4], ps[5], k, backend="triton", deterministic=True
        )
        loss = kernels.hierarchical_loss(
            ps[0], idx, ps[1], ps[2], ps[3], 1, backend="triton", deterministic=True
        )
        recon = kernels.topk_decode(
            enc_vals, enc_idx, ps[1], ps[2], backend="triton", deterministic=True
        )
        (loss + recon.square().mean()).backward()
        return [loss.detach(), recon.detach()] + [p.grad for p in ps]

    first, second = run(), run()
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("with_b_pre", [False, True])
def test_deterministic_bias_gradients_repeat_bitwise_and_match_float64(with_b_pre, gen):
    """b_enc's (and b_pre's) gradient: per-latent sums of the sparse gradient by the segment
    reduction in a fixed order; 60 rows over 8 latents, so each sum has many terms."""
    b, d, f, k = 60, 19, 8, 5
    x = torch.randn(b, d, generator=gen)
    w_enc = torch.randn(f, d, generator=gen) / d**0.5
    b_enc = torch.randn(f, generator=gen) * 0.1
    b_pre = torch.randn(d, generator=gen) * 0.1
    weights = torch.randn(b, k, generator=gen)

    def grads(backend, dtype):
        ps = leaves(w_enc, b_enc, b_pre, dtype=dtype)
        vals, _ = kernels.topk_encode(
            x.to(dtype),
            ps[0],
            ps[1],
            k,
            b_pre=ps[2] if with_b_pre else None,
            backend=backend,
            deterministic=True,
        )
        (vals * weights.to(dtype)).sum().backward()
        return [ps[1].grad] + ([ps[2].grad] if with_b_pre else [])

    first, second = grads("triton", torch.float32), grads("triton", torch.float32)
    for a, c, r in zip(first, second, grads("torch", torch.float64), strict=True):
        assert torch.equal(a, c)
        assert rel_err(a, r) < TOL


def test_segment_sum_is_a_fixed_order_fp32_reduction(gen):
    """The deterministic per-latent sums: 3,000 items over 5 latents (one never used) against
    float64, the same bits on a repeat."""
    from sae.kernels.triton_ops import _segment_sum, latent_segments

    # positive values: a sum with cancellation could lose more than fp32's relative accuracy
    values = torch.rand(600, 5, generator=gen) + 0.5
    idx = torch.randint(0, 4, (600, 5), generator=gen)
    segs = latent_segments(idx, 5)
    sums = _segment_sum(values, segs)
    want = torch.zeros(5, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), values.double().reshape(-1)
    )
    assert sums.dtype == torch.float32 and sums[4] == 0
    assert rel_err(sums, want) < TOL
    assert torch.equal(sums, _segment_sum(values, segs))


@pytest.mark.parametrize("needs_w_grad", [True, False])
def test_hierarchical_loss_second_backward_is_refused_not_wrong(needs_w_grad, gen):
    """W_dec's gradient is computed in forward and scaled in place by backward: a second
    backward over a retained graph would return it scaled twice, so it raises; without a
    W_dec gradient nothing was consumed and a second backward repeats the first."""
    vals, idx, w, bias, x = sparse_inputs(5, 24, 30, 6, gen)
    v_, w_ = leaves(vals, w)
    w_.requires_grad_(needs_w_grad)
    loss = kernels.hierarchical_loss(v_, idx, w_, bias, x, backend="triton")
    (2 * loss).backward(retain_graph=True)
    first = v_.grad.clone()
    v_.grad = None
    if needs_w_grad:
        with pytest.raises(RuntimeError, match="supports one backward per forward"):
            (2 * loss).backward()
    else:
        (2 * loss).backward()
        assert torch.equal(v_.grad, first)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hierarchical_loss_refuses_an_empty_batch_on_both_paths(backend, gen):
    vals, idx, w, bias, x = sparse_inputs(1, 16, 20, 4, gen)
    vals, idx, x = vals[:0], idx[:0], x[:0]
    with pytest.raises(ValueError, match=r"empty batch \(B = 0\)"):
        kernels.hierarchical_loss(vals, idx, w, bias, x, backend=backend)


def test_dispatcher_uses_reference_on_cpu_and_validates(gen, monkeypatch):
    vals, idx, w, bias, x = sparse_inputs(4, 10, 30, 5, gen)
    monkeypatch.delenv("SAE_KERNELS", raising=False)
    auto = kernels.hierarchical_loss(vals, idx, w, bias, x, 2)
    assert torch.equal(auto, reference.hierarchical_loss(vals, idx, w, bias, x, 2))
    monkeypatch.setenv("SAE_KERNELS", "triton")
    forced = kernels.topk_decode(vals, idx, w, bias)
    assert (
        rel_err(forced, reference.topk_decode(vals.double(), idx, w.double(), bias.double())) < TOL
    )
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.topk_decode(vals, idx, w, bias, backend="cuda")
    with pytest.raises(ValueError, match="every >= 1"):
        kernels.hierarchical_loss(vals, idx, w, bias, x, 0)
    assert kernels.loss_indices(20, 8) == [1, 8, 16]


def test_triton_ops_refuse_k_above_their_limit():
    """topk_encode refuses in its forward (not first in backward, after the work); the
    hierarchical loss is not linear in vals, so it does not split K as topk_decode does."""
    k = 1025
    vals, idx = torch.ones(2, k), torch.arange(k).repeat(2, 1)
    w, bias = torch.randn(k, 4), torch.zeros(4)
    msg = "k must be at most 1024 for the Triton kernels, got 1025"
    with pytest.raises(ValueError, match=msg):
        kernels.topk_encode(torch.randn(2, 4), w, torch.zeros(k), k, backend="triton")
    with pytest.raises(ValueError, match=msg):
        kernels.hierarchical_loss(vals, idx, w, bias, torch.zeros(2, 4), backend="triton")


@pytest.mark.parametrize(
    ("deterministic", "wgrad"), [(False, "segment"), (False, "atomic"), (True, "segment")]
)
def test_ops_linear_in_vals_split_k_above_the_limit(deterministic, wgrad, gen, monkeypatch):
    """topk_decode and encode_selected (whose dx is a decode over W_enc) with K > MAX_K: runs of
    MAX_K steps summed, the bias once; MAX_K lowered to 4 so K = 10 takes three runs."""
    from sae.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "MAX_K", 4)
    monkeypatch.setenv("SAE_KERNELS_WGRAD", wgrad)
    b, d, f, k = 5, 37, 40, 10
    vals, idx, w, bias, x = sparse_inputs(b, d, f, k, gen)
    w_enc, b_enc = torch.randn(f, d, generator=gen) / d**0.5, torch.randn(f, generator=gen) * 0.1
    with torch.no_grad():
        cand, cand_idx = kernels.topk_encode(x, w_enc, b_enc, k, backend="torch")
    grad_out, weights = torch.randn(b, d, generator=gen), torch.randn(b, k, generator=gen)

    def run(ps, backend):
        v, w_, b_, x_, w_e, b_e, c = ps
        det = {"backend": backend, "deterministic": deterministic}
        out = kernels.topk_decode(v, idx, w_, b_, **det)
        sel = kernels.encode_selected(x_, w_e, b_e, c, cand_idx, **det)
        ((out * grad_out.to(out.dtype)).sum() + (sel * weights.to(sel.dtype)).sum()).backward()
        return out, sel

    inputs = (vals, w, bias, x, w_enc, b_enc, cand)
    ours, ref = leaves(*inputs), leaves(*inputs, dtype=torch.float64)
    for a, r in zip(run(ours, "triton"), run(ref, "torch"), strict=True):
        assert rel_err(a, r) < TOL
    names = ("vals", "W_dec", "b_dec", "x", "W_enc", "b_enc", "selected vals")
    for name, a, r in zip(names, ours, ref, strict=True):
        assert rel_err(a.grad, r.grad) < TOL, name
