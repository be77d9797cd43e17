"""Training forwards and their custom gradients against direct formulas."""

from __future__ import annotations

import pytest
import torch

from sae.kernels import topk_decode, triton_ops
from sae.train import archs
from sae.train.archs import _JumpReLU, _Step, auxk_loss, forward_batchtopk, forward_topk
from sae.train.model import SAEConfig, SparseAutoencoder


def _sae(arch: str, k: int = 3) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_model=8, n_latents=24, k=k, arch=arch, input_scale=1.5))
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
    return sae


def test_jumprelu_pseudo_derivatives():
    z = torch.tensor([[0.10, 0.52, 0.49, 0.9], [0.55, 0.2, 0.45, 0.0]], requires_grad=True)
    theta = torch.full((4,), 0.5, requires_grad=True)
    eps = 0.1
    out = _JumpReLU.apply(z, theta, eps)
    torch.testing.assert_close(out, z.detach() * (z.detach() > 0.5))
    out.sum().backward()
    torch.testing.assert_close(z.grad, (z.detach() > 0.5).float())
    near = ((z.detach() - 0.5).abs() < eps / 2).float()  # rectangle kernel K((z-θ)/ε)
    torch.testing.assert_close(theta.grad, (-(0.5 / eps) * near).sum(0))
    theta.grad = None
    z.grad = None
    _Step.apply(z, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, (-(1 / eps) * near).sum(0))
    assert torch.count_nonzero(z.grad) == 0


def test_hierarchical_loss_is_mean_over_prefixes():
    sae = _sae("hierarchical", k=4)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    fwd = forward_topk(sae, x, hierarchical=True)
    target = x * 1.5
    pre = (target - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(4, dim=1)
    vals = vals.relu()
    losses = []
    for j in range(1, 5):
        recon = sae.b_dec + (vals[:, :j, None] * sae.W_dec[idx[:, :j]]).sum(1)
        losses.append((recon - target).pow(2).sum(1).mean())
    torch.testing.assert_close(fwd.loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fwd.recon(), sae.b_dec + (vals[..., None] * sae.W_dec[idx]).sum(1))
    assert fwd.fired.sum() == len(set(idx[vals > 0].tolist()))


def test_batchtopk_keeps_n_times_k_over_the_batch():
    sae = _sae("batchtopk", k=3)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    fwd = forward_batchtopk(sae, x)
    acts = ((x * 1.5 - sae.b_dec) @ sae.W_enc.T + sae.b_enc).relu().detach()
    kept = acts.flatten().topk(18).values
    torch.testing.assert_close(fwd.min_kept, kept[kept > 0].min())
    torch.testing.assert_close(fwd.l0, (acts >= kept.min()).sum() / 6.0)


def _batchtopk_case(k: int, n_latents: int, seed: int):
    cfg = SAEConfig(d_model=8, n_latents=n_latents, k=k, arch="batchtopk", input_scale=1.5)
    sae = SparseAutoencoder(cfg)
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(seed + 1))
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(seed + 2)).mul_(0.1)
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(seed + 3))
    return sae, x


def _assert_same_forward(got: list[torch.Tensor], want: list[torch.Tensor], atol: float) -> None:
    """_loss_and_grads of two BatchTopK paths agree, named where they do not."""
    names = ("loss", "l0", "min_kept", "fired", "recon", "W_enc", "b_enc", "W_dec", "b_dec")
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=name)


def _record_decodes(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the values each sparse decode of BatchTopK is given, in call order."""
    decodes = []

    def counting_decode(vals, *args, **kwargs):
        decodes.append(tuple(vals.shape))
        return topk_decode(vals, *args, **kwargs)

    monkeypatch.setattr(archs, "topk_decode", counting_decode)
    return decodes


def _loss_and_grads(sae, fwd) -> list[torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    fwd.loss.backward()
    grads = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    return [fwd.loss.detach(), fwd.l0, fwd.min_kept, fwd.fired, fwd.recon(), *grads]


@pytest.mark.parametrize(
    ("backend", "deterministic"), [("torch", False), ("triton", False), ("triton", True)]
)
def test_batchtopk_sparse_path_equals_dense(backend, deterministic, monkeypatch):
    """Candidates (4k per row) + the sparse kernels give the dense path's loss, metrics and
    gradients (9 rows, k = 10 over 200 latents). Each row's kept activations are cut into
    pieces of 8 (PACK_WIDTH here), one kernel row each, and summed back per row (by one
    index_add, or one per piece number when deterministic)."""
    monkeypatch.setenv("SAE_KERNELS", backend)  # triton: the kernels under TRITON_INTERPRET
    monkeypatch.setattr(archs, "PACK_WIDTH", 8)
    decodes = _record_decodes(monkeypatch)
    sae, x = _batchtopk_case(k=10, n_latents=200, seed=7)
    dense = _loss_and_grads(sae, forward_batchtopk(sae, x, sparse=False))
    sparse = _loss_and_grads(
        sae, forward_batchtopk(sae, x, sparse=True, deterministic=deterministic)
    )
    # one decode, one kernel row per piece of 8 of each row's kept count
    acts = sae.pre_acts(x).relu()
    counts = (acts >= acts.flatten().topk(9 * 10).values[-1]).sum(1)
    assert decodes == [(int((counts + 7).div(8, rounding_mode="floor").sum()), 8)], decodes
    assert counts.max() > 16  # some row really is cut into three pieces or more
    assert forward_batchtopk(sae, x, sparse=True).candidates is None  # nothing to change
    _assert_same_forward(sparse, dense, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batchtopk_row_beyond_its_candidates_is_taken_in_full(backend, monkeypatch):
    """One row with a huge norm holds all 18 of the batch's n·k activations, more than its 8
    candidates: that row alone is encoded densely (without gradient), the cut is taken again
    with its full row (the candidates' cut would keep 10 activations of other rows), its 18
    kept activations are decoded by the sparse kernels in pieces of 8, and the result is the
    dense path's."""
    monkeypatch.setenv("SAE_KERNELS", backend)
    decodes = _record_decodes(monkeypatch)
    sae, x = _batchtopk_case(k=2, n_latents=60, seed=11)
    x = x.clone()
    x[4] *= 50.0
    dense = _loss_and_grads(sae, forward_batchtopk(sae, x, sparse=False))
    fwd = forward_batchtopk(sae, x, sparse=True)
    assert fwd.dense_rows == 1
    assert decodes == [(3, 8)]  # row 4's 18 in pieces of 8; the others keep nothing
    assert fwd.l0.item() == pytest.approx(18 / 9)  # all 18 in row 4
    _assert_same_forward(_loss_and_grads(sae, fwd), dense, atol=1e-5)
    assert fwd.candidates == 16  # twice the 4k tried: the next batches take more
    # the candidates keep doubling while a row is short; then no row goes dense
    tried = [fwd.candidates]
    while (again := forward_batchtopk(sae, x, sparse=True, candidates=tried[-1])).candidates:
        tried.append(again.candidates)
    assert tried == [16, 32], tried  # 18 kept, all in row 4: 32 candidates hold them
    assert again.dense_rows == 0
    for a, b in zip(_loss_and_grads(sae, again), dense, strict=True):  # sums in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("backend", "deterministic"), [("torch", False), ("triton", False), ("triton", True)]
)
def test_batchtopk_short_row_in_full_with_the_others_in_pieces(backend, deterministic, monkeypatch):
    """A row with 3× the norm is short of its 40 candidates and is taken in full, while the 8
    others keep their candidates; all are decoded in one call, in pieces of 8, and the sum is
    the dense path's."""
    monkeypatch.setenv("SAE_KERNELS", backend)
    monkeypatch.setattr(archs, "PACK_WIDTH", 8)
    sae, x = _batchtopk_case(k=10, n_latents=200, seed=7)
    x = x.clone()
    x[2] *= 3.0
    dense = _loss_and_grads(sae, forward_batchtopk(sae, x, sparse=False))
    fwd = forward_batchtopk(sae, x, sparse=True, deterministic=deterministic)
    assert fwd.dense_rows == 1 and fwd.candidates == 80
    kept_rows = (fwd.recon() != sae.b_dec).any(1)
    assert kept_rows.sum() > 2  # rows besides the dense one keep activations
    _assert_same_forward(_loss_and_grads(sae, fwd), dense, atol=1e-5)


def test_batchtopk_candidates_stop_at_the_kernels_limit(monkeypatch):
    """The candidates double only up to what the sparse kernels take per row (1024 there; 16
    here), instead of handing the kernels a K they refuse (on the H200 a run reached 2048 and
    failed); past it a short row is taken in full every time."""
    monkeypatch.setattr(archs, "MAX_CANDIDATES", 16)
    sae, x = _batchtopk_case(k=2, n_latents=60, seed=11)
    x = x.clone()
    x[4] *= 50.0  # 18 kept, all in row 4: more than 16 candidates hold
    dense = _loss_and_grads(sae, forward_batchtopk(sae, x, sparse=False))
    assert forward_batchtopk(sae, x, sparse=True).candidates == 16
    again = forward_batchtopk(sae, x, sparse=True, candidates=16)
    assert (again.candidates, again.dense_rows) == (None, 1)  # at the limit: asks no more
    for a, b in zip(_loss_and_grads(sae, again), dense, strict=True):  # sums in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert forward_batchtopk(sae, x, sparse=True, candidates=64).candidates is None  # clamped
    monkeypatch.undo()
    assert archs.MAX_CANDIDATES == triton_ops.MAX_K  # the limit is the kernels' own


def test_batchtopk_path_knob_names_its_choices(monkeypatch):
    sae, x = _batchtopk_case(k=2, n_latents=60, seed=3)
    monkeypatch.setenv("SAE_BATCHTOPK", "fast")
    with pytest.raises(ValueError, match="SAE_BATCHTOPK must be one of auto, sparse, dense"):
        forward_batchtopk(sae, x)


def test_auxk_uses_only_dead_latents():
    sae = _sae("topk", k=2)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    fwd = forward_topk(sae, x, hierarchical=False)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[[1, 5, 7, 11, 20]] = True
    aux = auxk_loss(sae, fwd, dead, aux_k=3)
    residual = fwd.target - fwd.recon()
    pre = (fwd.target - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    pre_dead = pre.masked_fill(~dead, float("-inf"))
    vals, idx = pre_dead.topk(3, dim=1)
    aux_recon = (vals.relu()[..., None] * sae.W_dec[idx]).sum(1)
    torch.testing.assert_close(aux, (aux_recon - residual).pow(2).sum(1).mean())
    assert auxk_loss(sae, fwd, torch.zeros(24, dtype=torch.bool), aux_k=3) is None
