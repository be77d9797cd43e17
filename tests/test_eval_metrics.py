"""Eval metrics against closed-form values, and against the trainer's own held-out eval."""

from __future__ import annotations

import math

import pytest
import torch

from sae.eval.evaluate import evaluate_sae, plan_settings
from sae.eval.metrics import (
    RankCosineAccumulator,
    VarianceAccumulator,
    dead_counts,
    fvu,
    log10_histogram,
)
from sae.train.model import SAEConfig, SparseAutoencoder


def axis_sae(scale: float = 1.0, arch: str = "topk", k: int = 2) -> SparseAutoencoder:
    """d=4, 8 latents: ±e_0..±e_3 as encoder and decoder rows, zero biases."""
    cfg = SAEConfig(d_model=4, n_latents=8, k=k, arch=arch, input_scale=scale)
    sae = SparseAutoencoder(cfg)
    eye = torch.eye(4)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(torch.cat([eye, -eye]))
    return sae


# Two rows (3, 1, 0, 0) and (5, 2, 0, 0): mean (4, 1.5, 0, 0), Σ||x − x̄||² = 2.5.
ROWS = torch.tensor([[3.0, 1.0, 0.0, 0.0], [5.0, 2.0, 0.0, 0.0]])


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_hand_constructed_sae_closed_form(scale: float) -> None:
    sae = axis_sae(scale)
    # Rows are model space; the SAE sees x·s, so feed x/s for the same SAE-space inputs.
    x = ROWS / scale
    plan = plan_settings("topk", 8, 2, [1, 2, 3, 16])
    assert [s.k for s in plan.settings] == [1, 2, 3]
    assert plan.skipped == ["k=16 skipped: larger than the dictionary (8 latents)"]
    result = evaluate_sae(sae, [x[:1], x[1:]], plan)  # two batches: streaming must not matter
    by_k = {row["k"]: row for row in result.rows}
    # top-1 keeps e_0 only: errors 1² and 2² (in SAE space) -> FVU = 5 / 2.5 = 2.
    assert by_k[1]["fvu"] == pytest.approx(2.0, rel=1e-12)
    assert by_k[1]["ev"] == pytest.approx(-1.0, rel=1e-12)
    assert by_k[1]["mse"] == pytest.approx(5.0 / (2 * 4) / scale**2, rel=1e-12)
    assert (by_k[1]["l0"], by_k[1]["dead"], by_k[1]["almost_dead"]) == (1.0, 7, 7)
    # top-2 is exact; k=3's third latent has pre-activation 0, so it is not active.
    for k in (2, 3):
        assert by_k[k]["fvu"] == 0.0 and by_k[k]["mse"] == 0.0
        assert (by_k[k]["l0"], by_k[k]["dead"]) == (2.0, 6)
    assert result.top_ev(1) == pytest.approx(-1.0) and result.top_ev(2) == 1.0
    assert result.rank_cosine == [0.0]  # e_0 ⟂ e_1 (ranks limited to the training k = 2)
    assert result.n_rows == 2
    assert result.histogram_setting == "top-2"
    freq = result.histograms["log10_frequency"]
    assert freq["excluded"] == 6 and sum(freq["counts"]) == 2


def test_threshold_and_jumprelu_settings() -> None:
    sae = axis_sae(arch="batchtopk")
    sae.threshold.fill_(1.5)  # keeps e_0 in both rows and e_1 only in row 2 (value 2)
    plan = plan_settings("batchtopk", 8, 2, [1])
    assert [s.label for s in plan.settings] == ["top-1", "threshold"]
    result = evaluate_sae(sae, [ROWS], plan)
    thr = result.rows[-1]
    assert thr["mode"] == "threshold" and thr["k"] is None
    assert thr["l0"] == 1.5 and thr["fvu"] == pytest.approx(1.0 / 2.5)
    assert result.histogram_setting == "threshold"
    jump = plan_settings("jumprelu", 8, 0, None)
    assert [s.label for s in jump.settings] == ["threshold"]


def test_default_plan_adds_training_k() -> None:
    plan = plan_settings("hierarchical", 100, 48, None)
    assert [s.k for s in plan.settings] == [1, 2, 4, 8, 16, 32, 48, 64]
    assert len(plan.skipped) == 3 and plan.natural.k == 48


def test_variance_accumulator_streams_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=gen, dtype=torch.float64) + 1e4  # large mean
    acc = VarianceAccumulator(7)
    for part in x.split([1, 300, 5, 694]):
        acc.update(part)
    expected = float((x - x.mean(0)).pow(2).sum())
    assert acc.n == 1000 and acc.total == pytest.approx(expected, rel=1e-9)
    x_hat = x + 0.1
    assert fvu(x, x_hat) == pytest.approx(0.01 * 7000 / expected, rel=1e-9)


def test_dead_and_almost_dead_counts() -> None:
    freq = torch.tensor([0.0, 0.0, 5e-6, 9.99e-6, 1e-5, 0.3], dtype=torch.float64)
    assert dead_counts(freq) == (2, 4)


def test_rank_cosine_known_angles() -> None:
    W = torch.tensor([[1.0, 0.0], [2.0**-0.5, 2.0**-0.5], [0.0, 1.0]])
    acc = RankCosineAccumulator(3)
    acc.update(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[0, 1, 2]]), W)
    acc.update(torch.tensor([[3.0, 2.0, 0.0]]), torch.tensor([[0, 2, 1]]), W)  # rank 3 inactive
    means = acc.result()
    assert means[0] == pytest.approx((2**-0.5 + 0.0) / 2)
    assert means[1] == pytest.approx(2**-0.5)  # only the first row counts


def test_log10_histogram_fixed_bins() -> None:
    hist = log10_histogram(torch.tensor([0.0, math.nan, 1e-3, 1e-3, 1e-12, 10.0]), [-4, -2, 0])
    assert hist["counts"] == [3, 1] and hist["excluded"] == 2


def test_topk_sae_at_its_k_matches_trainer_eval(tmp_path) -> None:
    from sae.train.config import TrainConfig
    from sae.train.data import TensorSource
    from sae.train.trainer import train
    from tests.planted import planted_activations, planted_dictionary

    dictionary = planted_dictionary(24, 16)
    acts = planted_activations(dictionary, 2048 + 512) * 3.0 + 0.5
    source = TensorSource(acts[:2048], acts[2048:])
    cfg = TrainConfig(
        cache="memory",
        out=str(tmp_path / "run"),
        arch="topk",
        k=4,
        n_latents=48,
        batch=256,
        lr=4e-3,
        tokens=2048,
        eval_every=0,
        eval_tokens=512,
        device="cpu",
        progress=False,
        init_tokens=512,
    )
    summary = train(cfg, source)
    from sae import load

    sae = load(str(tmp_path / "run"))
    result = evaluate_sae(sae, acts[2048:].split(100), plan_settings("topk", 48, 4, [4]))
    assert result.rows[0]["fvu"] == pytest.approx(summary["fvu"], rel=1e-4)
    assert result.rows[0]["l0"] == pytest.approx(summary["l0"], rel=1e-6)
    assert result.rows[0]["dead"] == summary["dead"]
