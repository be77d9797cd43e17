"""The fused decoder step (Triton, interpreter on CPU) against float64 and the three-step path."""

from __future__ import annotations

import pytest
import torch

from sae.kernels.decoder_adam import decoder_adam_reference, decoder_adam_step
from sae.train.optim import DecoderAdam


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.seed()  # fresh inputs on every run
    return g


def unit_rows(f: int, d: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(f, d, generator=gen)
    return w / w.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("d", [37, 1500])  # one ragged chunk; two chunks, the last ragged
def test_kernel_matches_float64_reference(d, gen):
    f, step, lr, betas, eps = 9, 4, 3e-3, (0.9, 0.999), 1e-8
    p = unit_rows(f, d, gen)
    g = torch.randn(f, d, generator=gen) * 0.1
    m = torch.randn(f, d, generator=gen) * 0.01
    v = torch.rand(f, d, generator=gen) * 1e-3
    ref = [t.double() for t in (p, g, m, v)]
    decoder_adam_reference(*ref, step, lr, betas, eps)
    got = [t.clone() for t in (p, m, v)]
    decoder_adam_step(got[0], g, got[1], got[2], torch.tensor(float(step)), lr, betas, eps)
    for name, a, want in zip(
        ("param", "exp_avg", "exp_avg_sq"), got, (ref[0], ref[2], ref[3]), strict=True
    ):
        err = float((a.double() - want).norm() / want.norm())
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
    torch.testing.assert_close(got[0].norm(dim=1), torch.ones(f))


def test_kernel_rejects_wrong_layout(gen):
    p = unit_rows(4, 8, gen)
    with pytest.raises(ValueError, match="contiguous fp32"):
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


def test_fused_and_three_step_paths_agree_and_share_state(gen):
    plain = _params(gen)
    fused = [torch.nn.Parameter(t.detach().clone()) for t in plain]
    opt_plain = DecoderAdam(plain, plain[1], 1e-2)
    opt_fused = DecoderAdam(fused, fused[1], 1e-2, fused_decoder=True)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=gen) for t in plain]
        for params in (plain, fused):
            for t, gr in zip(params, grads, strict=True):
                t.grad = gr.clone()
        opt_plain.step()
        opt_fused.step()
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


def test_decoder_must_be_optimised(gen):
    params = _params(gen)
    with pytest.raises(ValueError, match="decoder must be one of the optimised parameters"):
        DecoderAdam(params[:1], params[1], 1e-3)
