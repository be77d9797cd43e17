"""Every architecture learns a planted sparse dictionary from a real cache written by the store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from planted import (
    planted_activations,
    planted_dictionary,
    recovery,
    write_planted_cache,
)

from sae.cli import app
from sae.train.config import TrainConfig
from sae.train.data import CacheSource
from sae.train.model import load_sae
from sae.train.trainer import geometric_median, lr_at, train

D_MODEL, N_FEATURES, ACTIVE, N_TOKENS = 32, 64, 3, 64_000


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    dictionary = planted_dictionary(N_FEATURES, D_MODEL)
    url = str(tmp_path_factory.mktemp("planted") / "cache")
    write_planted_cache(url, planted_activations(dictionary, N_TOKENS, ACTIVE), chunk_rows=1024)
    return dictionary, url


ARCH_OPTIONS = {
    "hierarchical": {"k": ACTIVE},
    "topk": {"k": ACTIVE},
    "batchtopk": {"k": ACTIVE},
    "jumprelu": {"k": 0, "l0_coef": 0.1, "jumprelu_init_threshold": 0.3, "jumprelu_bandwidth": 0.1},
}


@pytest.mark.parametrize("arch", list(ARCH_OPTIONS))
def test_arch_recovers_planted_dictionary(tmp_path, planted, arch):
    dictionary, url = planted
    out = tmp_path / arch
    cfg = TrainConfig(
        cache=url,
        out=str(out),
        arch=arch,
        n_latents=128,
        batch=256,
        lr=4e-3,
        dead_tokens=20_000,
        eval_every=100,
        eval_tokens=4096,
        log_every=25,
        checkpoint_every=10_000,
        progress=False,
        device="cpu",
        **ARCH_OPTIONS[arch],
    )
    summary = train(cfg)
    assert summary["fvu"] < 0.1, summary
    sae = load_sae(out)
    assert recovery(sae.W_dec.detach(), dictionary) > 0.9
    # Run directory contract: config (full TrainConfig), metrics, summary, unit decoder rows.
    saved = json.loads((out / "config.json").read_text())
    assert saved["arch"] == arch and saved["n_latents"] == 128 and saved["cache_url"] == url
    assert saved["steps"] == summary["steps"] == (N_TOKENS - _heldout(url)) // 256
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("split") == "heldout" for r in rows) and rows[-1]["step"] == summary["steps"]
    mean_sq = (load_sae(out).cfg.input_scale ** 2) * _mean_sq_norm(url)
    assert abs(mean_sq - D_MODEL) / D_MODEL < 0.05  # input scale: mean squared norm → d_model
    if arch == "batchtopk":  # θ learned and used at inference: L0 near k without per-token top-k
        assert sae.threshold.min() > 0 and torch.all(sae.threshold == sae.threshold[0])
        assert 0.5 * ACTIVE < summary["l0"] < 2 * ACTIVE
    if arch == "jumprelu":
        assert summary["l0"] < 20 and not torch.all(sae.threshold == sae.threshold[0])


def _heldout(url: str) -> int:
    start, stop = CacheSource(url).cache.heldout_rows
    return stop - start


def _mean_sq_norm(url: str) -> float:
    return CacheSource(url).sample(16384, seed=0).pow(2).sum(1).mean().item()


def test_cli_train_writes_run_directory(tmp_path, planted):
    _, url = planted
    out = tmp_path / "run"
    args = ["train", "--cache", url, "--out", str(out), "--k", "4", "--latents", "128"]
    args += ["--batch", "256", "--tokens", "5K", "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 19 and summary["tokens"] == 19 * 256
    assert {p.name for p in out.iterdir()} >= {
        "sae.safetensors",
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints",
    }
    bad = CliRunner().invoke(app, [*args[:5], "--k", "500", "--latents", "128", "--overwrite"])
    assert "--k 500 is larger than the dictionary (128 latents)" in str(bad.exception)
    # options this arch does not use are said, and the run goes on
    noted = CliRunner().invoke(
        app, [*args, "--arch", "topk", "--loss-every", "4", "--l0-coef", "0.5", "--overwrite"]
    )
    assert noted.exit_code == 0, noted.output
    assert "note: --arch topk does not use --loss-every, --l0-coef" in noted.stderr


def test_training_never_reads_heldout_rows(tmp_path):
    n, batch = 2048, 64
    acts = torch.zeros(n, 8)
    acts[:, 0] = torch.arange(n, dtype=torch.float32)  # each row carries its index (exact in fp16)
    acts[:, 1] = 1.0
    url = str(tmp_path / "cache")
    write_planted_cache(url, acts, chunk_rows=64)
    source = CacheSource(url)
    start, stop = source.cache.heldout_rows
    assert stop > start
    stream = source.train_batches(batch, seed=0, rank=0, world_size=1, device="cpu", cursor=None)
    seen = torch.cat([next(stream)[:, 0] for _ in range(source.n_train_tokens // batch)])
    stream.close()
    assert not ((seen >= start) & (seen < stop)).any()
    held = source.heldout(10_000)[:, 0]
    assert torch.equal(held.sort().values, torch.arange(start, stop, dtype=torch.float32))


def test_lr_schedule_and_geometric_median():
    cfg = TrainConfig(cache="", out="", lr=1.0, warmup_steps=4, decay_fraction=0.5, steps=20)
    assert [lr_at(cfg, s) for s in (0, 3, 5, 10, 15, 19)] == [0.25, 1.0, 1.0, 1.0, 0.5, 0.1]
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    median = geometric_median(points)
    assert median.norm() < 1.0  # the outlier barely moves it, unlike the mean


def test_how_often_a_run_logs_does_not_change_how_it_trains(tmp_path, monkeypatch):
    """AuxK switches on by looking for dead latents on its own cadence, not at log steps: a
    run logging every step and one logging once train the same SAE, with AuxK active."""
    from sae.train import trainer
    from sae.train.data import TensorSource

    dictionary = planted_dictionary(N_FEATURES, D_MODEL)
    rows = planted_activations(dictionary, 256 * 40, ACTIVE)
    calls = []
    auxk = trainer.auxk_loss
    monkeypatch.setattr(trainer, "auxk_loss", lambda *a, **k: calls.append(1) or auxk(*a, **k))
    runs = {}
    for log_every in (1, 1000):  # deterministic: bitwise-repeatable on the CPU too
        out = tmp_path / f"log{log_every}"
        options = {"k": ACTIVE, "n_latents": 512, "batch": 256, "dead_tokens": 512}
        cfg = TrainConfig(cache="memory", out=str(out), log_every=log_every, eval_every=0,
                          progress=False, device="cpu", arch="topk", deterministic=True,
                          **options)  # fmt: skip
        calls.clear()
        train(cfg, TensorSource(rows, rows[:256]))
        runs[log_every] = (load_sae(out), len(calls))
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    (a, calls_a), (b, calls_b) = runs[1], runs[1000]
    assert calls_a == calls_b > 0  # AuxK ran, on the same steps
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor), name
