"""The row top-k kernel (interpreter on CPU) is exact: torch.topk's values, columns that hold them."""

from __future__ import annotations

import pytest
import torch

from sae import kernels
from sae.kernels import reference
from sae.kernels.topk import TILE_ENV, TOPK_ENV, row_topk, topk_method


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.seed()  # fresh inputs on every run
    return g


def assert_exact_topk(x: torch.Tensor, k: int, vals: torch.Tensor, idx: torch.Tensor) -> None:
    want = x.topk(k, dim=1, sorted=True).values
    assert idx.dtype == torch.int64 and idx.shape == want.shape
    assert torch.equal(vals, want), "values differ from torch.topk"
    assert torch.equal(x.gather(1, idx), vals), "indices do not point at the returned values"
    assert all(len(set(row.tolist())) == k for row in idx), "a column was picked twice"


@pytest.mark.parametrize(
    "dtype, ks", [(torch.float32, (1, 32, 100)), (torch.bfloat16, (7,)), (torch.float16, (7,))]
)
def test_matches_torch_topk_on_random_rows(dtype, ks, gen):
    x = (torch.randn(4, 3000, generator=gen) * 3).to(dtype)  # ragged last group
    for k in ks:
        assert_exact_topk(x, k, *row_topk(x, k, "select"))


def test_negative_rows_and_infinities(gen):
    x = -torch.rand(5, 2048, generator=gen) - 1.0  # all negative: the key trick's other half
    x[0, 7] = float("inf")
    x[1, :] = float("-inf")
    x[1, 100:105] = -3.0
    x[2, :1500] = float("-inf")
    for k in (1, 8, 20):
        assert_exact_topk(x, k, *row_topk(x, k, "select"))


def test_rows_mostly_minus_inf_with_padding_groups(gen):
    """n = 3000, k = 300: 1,500 groups of 2 padded to 2,048, so 548 padding groups. They rank
    below groups of -infs; tied with them, pass 2 read padding instead of real -infs (NaNs and
    wrong columns came out)."""
    x = torch.full((5, 3000), float("-inf"))
    x[0, [5, 700, 2500]] = torch.tensor([1.0, 2.0, 3.0])
    x[1, :400] = torch.randn(400, generator=gen)
    x[2, 2990:] = -torch.rand(10, generator=gen)  # the finite values in the ragged tail
    x[3, ::2] = torch.randn(1500, generator=gen)  # every group holds one finite value
    # row 4: all -inf
    assert_exact_topk(x, 300, *row_topk(x, 300, "select"))


def test_nans_rank_first_whatever_their_sign_as_in_torch_topk(gen):
    x = torch.randn(3, 2048, generator=gen)
    neg_nan = torch.tensor([-4194304], dtype=torch.int32).view(torch.float32)  # 0xFFC00000
    assert neg_nan.isnan().all() and neg_nan.view(torch.int32) < 0
    x[0, 5] = neg_nan
    x[1, 9] = float("nan")
    x[1, 700] = neg_nan
    vals, idx = row_topk(x, 4, "select")
    want = x.topk(4, dim=1, sorted=True)
    assert torch.equal(vals.isnan(), want.values.isnan())
    assert torch.equal(vals.nan_to_num(), want.values.nan_to_num())
    assert set(idx[1, :2].tolist()) == {9, 700} and idx[0, 0] == 5
    assert torch.equal(idx[:, 2:], want.indices[:, 2:]) and torch.equal(idx[2], want.indices[2])


def test_heavy_ties_take_the_exact_path(gen):
    """Ties at the k-th value overflow the candidate buffer: the bisection path must be exact."""
    x = torch.randint(0, 3, (4, 2048), generator=gen).float()  # ~680 columns per value
    x[0] = 1.0  # one value everywhere
    x[1, :] = torch.arange(2048) % 2  # half ones: k-th value tied 1024 ways
    for k in (1, 5, 16, 40):
        assert_exact_topk(x, k, *row_topk(x, k, "select"))


def test_all_winners_in_one_group(gen):
    x = torch.randn(3, 4096, generator=gen)
    x[:, 640:672] += 100.0  # the whole top 32 lies in one group
    assert_exact_topk(x, 32, *row_topk(x, 32, "select"))


def test_falls_back_where_the_kernel_does_not_apply(gen):
    x = torch.randn(3, 100, generator=gen)  # fewer columns than the default 8k groups
    assert_exact_topk(x, 30, *row_topk(x, 30, "select"))
    y = torch.randint(0, 100, (3, 512), generator=gen)  # integer rows
    vals, _ = row_topk(y, 5, "select")
    assert torch.equal(vals, y.topk(5, dim=1).values)


def test_method_knob(monkeypatch):
    monkeypatch.delenv(TOPK_ENV, raising=False)
    assert topk_method() == "select"
    monkeypatch.setenv(TOPK_ENV, "torch")
    assert topk_method() == "torch"
    monkeypatch.setenv(TOPK_ENV, "radix")
    with pytest.raises(ValueError, match="SAE_KERNELS_TOPK must be one of select, torch"):
        topk_method()
    monkeypatch.delenv(TOPK_ENV)
    x = torch.randn(2, 1024)
    monkeypatch.setenv(TILE_ENV, "1000,8,4")
    with pytest.raises(ValueError, match='SAE_KERNELS_TOPK_TILE="a,b,warps": a must be a power'):
        row_topk(x, 4)
    monkeypatch.setenv(TILE_ENV, "1024,3,4")  # groups per k: any count of at least 1
    assert_exact_topk(x, 4, *row_topk(x, 4))
    monkeypatch.setenv(TILE_ENV, "1024,0,4")
    with pytest.raises(ValueError, match="b must be an integer of at least 1, got '1024,0,4'"):
        row_topk(x, 4)
    monkeypatch.setenv(TILE_ENV, "1024,8,3")
    with pytest.raises(ValueError, match="warps must be one of 1, 2, 4, 8, 16, got '1024,8,3'"):
        row_topk(x, 4)
    monkeypatch.setenv(TILE_ENV, "1024,8")
    with pytest.raises(
        ValueError, match='SAE_KERNELS_TOPK_TILE must be three integers "a,b,warps"'
    ):
        row_topk(x, 4)


def test_triton_encoder_uses_it_and_matches_reference(gen, monkeypatch):
    """topk_encode on the Triton path (interpreter) with F large enough for the prefilter."""
    b, d, f, k = 9, 33, 1024, 12
    x = torch.randn(b, d, generator=gen)
    w = torch.randn(f, d, generator=gen) / d**0.5
    bias = torch.randn(f, generator=gen) * 0.1
    vals, idx = kernels.topk_encode(x, w, bias, k, backend="triton")
    ref_vals, _ = reference.topk_encode(x.double(), w.double(), bias.double(), k)
    assert torch.allclose(vals.double(), ref_vals, rtol=1e-5, atol=1e-6)
    pre = x @ w.T + bias
    assert torch.equal(pre.gather(1, idx).relu(), vals)
