"""The fused decoder step (Triton, interpreter on CPU) against float64 and the three-step path."""

from __future__ import annotations

import pytest
import torch

from sae.kernels.decoder_adam import (
    adam_reference,
    adam_step,
    decoder_adam_step,
    stochastic_bf16,
)
from sae.train.optim import DecoderAdam


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.seed()  # fresh inputs on every run
    return g


def unit_rows(f: int, d: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(f, d, generator=gen)
    return w / w.norm(dim=1, keepdim=True)


BF16_STEP = 2.0**-7  # bf16 keeps 8 significant bits: neighbours are at most this far apart


@pytest.mark.parametrize("state", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [37, 1500])  # one ragged chunk; two chunks, the last ragged
def test_decoder_kernel_matches_float64_reference(d, state, gen):
    f, step, lr, betas, eps = 9, 4, 3e-3, (0.9, 0.999), 1e-8
    p = unit_rows(f, d, gen)
    g = torch.randn(f, d, generator=gen) * 0.1
    m = (torch.randn(f, d, generator=gen) * 0.01).to(state)
    v = (torch.rand(f, d, generator=gen) * 1e-3).to(state)
    ref_p = p.double()
    ref_m, ref_v = adam_reference(ref_p, g.double(), m, v, step, lr, betas, eps, decoder=True)
    got = [p.clone(), m.clone(), v.clone()]
    decoder_adam_step(got[0], g, got[1], got[2], torch.tensor(float(step)), lr, betas, eps)
    _assert_step(got, (ref_p, ref_m, ref_v), state)
    torch.testing.assert_close(got[0].norm(dim=1), torch.ones(f))


@pytest.mark.parametrize("state", [torch.float32, torch.bfloat16])
def test_flat_kernel_matches_float64_reference(state, gen):
    n, step, lr, betas, eps = 5000, 7, 1e-2, (0.9, 0.999), 1e-8  # three blocks, the last ragged
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * 0.1
    m = (torch.randn(n, generator=gen) * 0.01).to(state)
    v = (torch.rand(n, generator=gen) * 1e-3).to(state)
    ref_p = p.double()
    ref_m, ref_v = adam_reference(ref_p, g.double(), m, v, step, lr, betas, eps)
    got = [p.clone(), m.clone(), v.clone()]
    adam_step(got[0], g, got[1], got[2], torch.tensor(float(step)), lr, betas, eps)
    _assert_step(got, (ref_p, ref_m, ref_v), state)


def _assert_step(got, ref, state) -> None:
    """The parameter update uses unrounded moments; stored moments within one storage step."""
    err = float((got[0].double() - ref[0]).norm() / ref[0].norm())
    assert err < 1e-5, f"param: relative error {err:.2e}"
    for name, a, want in zip(("exp_avg", "exp_avg_sq"), got[1:], ref[1:], strict=True):
        assert a.dtype == state
        if state == torch.float32:
            err = float((a.double() - want).norm() / want.norm())
            assert err < 1e-5, f"{name}: relative error {err:.2e}"
        else:
            # + 1e-8: the fp32 sum β·m + (1 − β)·g itself, where its terms nearly cancel
            gap = (a.double() - want).abs()
            assert (gap <= want.abs() * BF16_STEP + 1e-8).all(), f"{name}: beyond one bf16 step"


@pytest.mark.parametrize("rounding", ["kernel", "torch"])
def test_stochastic_rounding_is_unbiased(rounding, gen):
    """20,000 copies of one value, rounded: each lands on a bf16 neighbour, the mean on the value."""
    value = 1.0 + 2.0**-9 + 2.0**-11  # 0.3125 of the way from 1.0 to the next bf16 (1 + 2^-7)
    n = 20000
    if rounding == "torch":
        out = stochastic_bf16(torch.full((n,), value), generator=gen)
    else:
        # One Adam step from zero state with β1 ≈ 0 stores m = g exactly before rounding.
        p, m, v = (
            torch.zeros(n),
            torch.zeros(n, dtype=torch.bfloat16),
            torch.zeros(n, dtype=torch.bfloat16),
        )
        adam_step(p, torch.full((n,), value), m, v, torch.tensor(1.0), 1e-3, (1e-30, 0.999), 1e-8)
        out = m
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    up = float((out.float() > 1.0).double().mean())
    assert abs(up - 0.3125) < 0.02, f"rounded up {up:.3f} of the time, expected 0.3125"


def test_kernel_rejects_wrong_layout(gen):
    p = unit_rows(4, 8, gen)
    with pytest.raises(ValueError, match="Adam kernels need a contiguous"):
        decoder_adam_step(
            p,
            p.t().contiguous().t(),
            p.clone(),
            p.clone(),
            torch.tensor(1.0),
            1e-3,
            (0.9, 0.999),
            1e-8,
        )


def _params(gen):
    w_dec = torch.nn.Parameter(unit_rows(6, 40, gen))
    w_enc = torch.nn.Parameter(torch.randn(6, 40, generator=gen))
    b_dec = torch.nn.Parameter(torch.randn(40, generator=gen))
    return [w_enc, w_dec, b_dec]


def _step_both(*runs, gen) -> None:
    """One step of each (optimiser, parameters) run, all with the same random gradients."""
    grads = [torch.randn(t.shape, generator=gen) for t in runs[0][1]]
    for opt, params in runs:
        for t, gr in zip(params, grads, strict=True):
            t.grad = gr.clone()
        opt.step()


def test_cpu_decoder_step_is_torch_adam_between_projection_and_renorm(gen):
    """The CPU path (adam_reference) against the three steps it stands for, done with
    torch.optim.Adam itself."""
    w0 = unit_rows(6, 40, gen)
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, torch_opt = DecoderAdam([ours], ours, 1e-2), torch.optim.Adam([ref], lr=1e-2)
    for _ in range(3):
        g = torch.randn(6, 40, generator=gen)
        ours.grad = g.clone()
        opt.step()
        with torch.no_grad():
            ref.grad = g - (g * ref).sum(1, keepdim=True) * ref
            torch_opt.step()
            ref /= ref.norm(dim=1, keepdim=True)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            opt.state[ours]["exp_avg_sq"], torch_opt.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-9
        )


def test_fused_and_cpu_paths_agree_and_share_state(gen):
    plain = _params(gen)
    fused = [torch.nn.Parameter(t.detach().clone()) for t in plain]
    opt_plain = DecoderAdam(plain, plain[1], 1e-2)
    opt_fused = DecoderAdam(fused, fused[1], 1e-2, fused_decoder=True)
    for _ in range(3):
        _step_both((opt_plain, plain), (opt_fused, fused), gen=gen)
        for a, b in zip(plain, fused, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain[1].norm(dim=1), torch.ones(6))
    state_plain, state_fused = opt_plain.state_dict(), opt_fused.state_dict()
    for i in range(3):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                state_plain["state"][i][key], state_fused["state"][i][key], rtol=1e-5, atol=1e-7
            )
        assert float(state_plain["state"][i]["step"]) == float(state_fused["state"][i]["step"]) == 3
    # A checkpoint of one path resumes in the other.
    opt_plain.load_state_dict(state_fused)


@pytest.mark.parametrize("fused_decoder", [False, True])
def test_the_radial_part_of_the_gradient_is_ignored(fused_decoder, gen):
    """A row's norm is fixed at 1, so gradient along the row must not change the step."""
    runs = []
    w0 = unit_rows(6, 40, gen)
    r = torch.randn(6, 40, generator=gen)
    tangential = r - (r * w0).sum(1, keepdim=True) * w0
    for radial in (0.0, 3.0):
        w = torch.nn.Parameter(w0.clone())
        opt = DecoderAdam([w], w, 1e-2, fused_decoder=fused_decoder)
        w.grad = tangential + radial * w0
        opt.step()
        runs.append(w.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-5)
    assert (runs[0] - w0).abs().max() > 1e-3  # and the step did move the rows


def test_bf16_moments_kernel_path_tracks_the_cpu_path(gen):
    """Both paths round stochastically (different streams), so they agree to rounding noise."""
    plain = _params(gen)
    fused = [torch.nn.Parameter(t.detach().clone()) for t in plain]
    bf16 = torch.bfloat16
    opt_plain = DecoderAdam(plain, plain[1], 1e-2, state_dtype=bf16)
    opt_fused = DecoderAdam(fused, fused[1], 1e-2, fused_decoder=True, state_dtype=bf16)
    for _ in range(3):
        _step_both((opt_plain, plain), (opt_fused, fused), gen=gen)
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4)
    torch.testing.assert_close(fused[1].norm(dim=1), torch.ones(6))
    for opt in (opt_plain, opt_fused):
        for state in opt.state_dict()["state"].values():
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == bf16
            assert float(state["step"]) == 3
    # An fp32 optimiser takes the bf16 state (torch casts it), and back again.
    as_fp32 = DecoderAdam(plain, plain[1], 1e-2)
    as_fp32.load_state_dict(opt_plain.state_dict())
    assert as_fp32.state[plain[0]]["exp_avg"].dtype == torch.float32
    opt_plain.load_state_dict(as_fp32.state_dict())
    assert opt_plain.state[plain[0]]["exp_avg"].dtype == bf16


def test_unknown_state_dtype(gen):
    params = _params(gen)
    with pytest.raises(ValueError, match="Adam moments must be float32 or bfloat16"):
        DecoderAdam(params, params[1], 1e-3, state_dtype=torch.float16)


def test_decoder_must_be_optimised(gen):
    params = _params(gen)
    with pytest.raises(ValueError, match="decoder must be one of the optimised parameters"):
        DecoderAdam(params[:1], params[1], 1e-3)
