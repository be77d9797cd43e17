"""A killed run resumed from its checkpoint ends bit-identical to a run that was never stopped."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from planted import (
    CrashAfter,
    planted_activations,
    planted_dictionary,
    write_planted_cache,
)

from sae.errors import SaeError
from sae.store import open_cache
from sae.train import archs, model
from sae.train.checkpoint import load_checkpoint
from sae.train.config import TrainConfig
from sae.train.data import CacheSource, TensorSource
from sae.train.model import SparseAutoencoder, load_sae
from sae.train.trainer import Trainer, train


def _config(out: Path, cache: str, arch: str, **overrides) -> TrainConfig:
    base = {
        "cache": cache,
        "out": str(out),
        "k": 4,
        "arch": arch,
        "n_latents": 64,
        "batch": 64,
        "tokens": 64 * 20,
        "lr": 2e-3,
        "warmup_steps": 3,
        "decay_fraction": 0.2,
        "dead_tokens": 128,  # AuxK is active, so its state must survive the resume too
        "eval_every": 4,
        "log_every": 3,
        "checkpoint_every": 10,
        "l0_coef": 0.1,
        "jumprelu_init_threshold": 0.3,
        "jumprelu_bandwidth": 0.1,
        "progress": False,
        "device": "cpu",
    }
    return TrainConfig(**(base | overrides))


def _straight_and_resumed(tmp_path: Path, make_source, cache: str, arch: str):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(straight, cache, arch), make_source())
    with pytest.raises(KeyboardInterrupt):
        train(_config(resumed, cache, arch), CrashAfter(make_source(), 13))
    assert not (resumed / "sae.safetensors").exists()
    train(_config(resumed, cache, arch, resume=True), make_source())
    return straight, resumed


def _assert_same_run(straight: Path, resumed: Path) -> None:
    a, b = load_sae(straight), load_sae(resumed)
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor), name
    lines_a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "seconds")} for r in rows
    ]
    assert strip(lines_a) == strip(lines_b)  # nothing lost, nothing logged twice
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 20


@pytest.mark.parametrize("arch", ["hierarchical", "batchtopk", "jumprelu"])
def test_resume_in_memory_is_bitwise(tmp_path, arch):
    dictionary = planted_dictionary(32, 16)
    train_rows = planted_activations(dictionary, 64 * 20)
    held = planted_activations(dictionary, 128, seed=4)
    make = lambda: TensorSource(train_rows, held)
    _assert_same_run(*_straight_and_resumed(tmp_path, make, "memory", arch))


def test_batchtopk_sparse_path_resumes_with_its_learnt_candidates(tmp_path, monkeypatch):
    """One candidate per k: the first batches go dense and double the candidates (4 → 16). The
    checkpoint keeps that count, so the resumed run decodes sparsely like the straight one
    instead of learning it again through dense batches (different sums, different bits)."""
    monkeypatch.setenv(archs.BATCHTOPK_ENV, "sparse")
    monkeypatch.setattr(archs, "CANDIDATES_PER_K", 1)
    dictionary = planted_dictionary(32, 16)
    train_rows = planted_activations(dictionary, 64 * 20)
    held = planted_activations(dictionary, 128, seed=4)
    make = lambda: TensorSource(train_rows, held)
    straight, resumed = _straight_and_resumed(tmp_path, make, "memory", "batchtopk")
    _assert_same_run(straight, resumed)
    ckpt = load_checkpoint(resumed)
    assert (ckpt["batchtopk_candidates"], ckpt["batchtopk_dense_steps"]) == (16, 2)


def test_resume_from_store_is_bitwise(tmp_path):
    dictionary = planted_dictionary(32, 16)
    url = str(tmp_path / "cache")
    write_planted_cache(url, planted_activations(dictionary, 64 * 24), chunk_rows=64)
    make = lambda: CacheSource(url)
    _assert_same_run(*_straight_and_resumed(tmp_path, make, url, "hierarchical"))


def test_resume_on_a_cache_of_another_layer_is_refused(tmp_path):
    """Two caches of one shape, layers 3 and 7: a run begun on the first does not continue on
    the second (half a run on other activations, and a config claiming the new layer)."""
    acts = planted_activations(planted_dictionary(32, 16), 64 * 24)
    first, second = str(tmp_path / "layer3"), str(tmp_path / "layer7")
    write_planted_cache(first, acts, chunk_rows=64, layer=3)
    write_planted_cache(second, acts, chunk_rows=64, layer=7)
    out = tmp_path / "run"
    train(_config(out, first, "topk", tokens=64 * 10), CacheSource(first))
    saved = (out / "config.json").read_text()
    with pytest.raises(SaeError, match=r"not the one the run .* layer 3 \(run\) vs 7 \(cache\)"):
        train(_config(out, second, "topk", tokens=64 * 20, resume=True), CacheSource(second))
    assert (out / "config.json").read_text() == saved  # the run is untouched
    summary = train(_config(out, first, "topk", tokens=64 * 20, resume=True), CacheSource(first))
    assert summary["steps"] == 20


def test_stream_cursor_of_another_cache_is_refused(tmp_path):
    """The store's own guard, for callers of Cache.batches(cursor=...): a cursor names the
    cache's identity and size (not its URL, so a copied cache still resumes)."""
    acts = planted_activations(planted_dictionary(32, 16), 64 * 8)
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    write_planted_cache(first, acts, chunk_rows=64, layer=3)
    write_planted_cache(second, acts, chunk_rows=64, layer=7)
    with open_cache(first).batches(64, epochs=1) as stream:
        next(iter(stream))
        cursor = stream.cursor()
    with pytest.raises(SaeError, match=r"made on another cache than .*b"):
        open_cache(second).batches(64, epochs=1, cursor=cursor)
    shutil.copytree(first, tmp_path / "copy")
    with open_cache(str(tmp_path / "copy")).batches(64, epochs=1, cursor=cursor) as stream:
        assert next(iter(stream)).shape == (64, 16)
    older = {k: v for k, v in cursor.items() if k != "cache"}  # written before the digest
    with open_cache(first).batches(64, epochs=1, cursor=older) as stream:
        assert next(iter(stream)).shape == (64, 16)


def test_finished_run_extends_with_more_tokens(tmp_path):
    dictionary = planted_dictionary(32, 16)
    rows = planted_activations(dictionary, 64 * 20)
    make = lambda: TensorSource(rows, rows[:64])
    out = tmp_path / "run"
    train(_config(out, "memory", "topk", tokens=64 * 10, decay_fraction=0.0), make())
    summary = train(_config(out, "memory", "topk", resume=True, decay_fraction=0.0), make())
    assert summary["steps"] == 20
    metrics = (out / "metrics.jsonl").read_text()
    train(_config(out, "memory", "topk", resume=True, decay_fraction=0.0), make())  # no-op
    assert (out / "metrics.jsonl").read_text() == metrics
    direct = tmp_path / "direct"
    train(_config(direct, "memory", "topk", decay_fraction=0.0), make())
    for name, tensor in load_sae(direct).state_dict().items():
        assert torch.equal(load_sae(out).state_dict()[name], tensor), name


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("kill", ["before_finishing", "before_the_config", "after_saving"])
def test_killed_while_finishing_resumes_to_the_same_run(tmp_path, monkeypatch, kill):
    """Killed after the final checkpoint (before the final held-out line), between the weights
    and config.json, or right after both: --resume completes the run as if never stopped."""
    dictionary = planted_dictionary(32, 16)
    rows = planted_activations(dictionary, 64 * 20)
    make = lambda: TensorSource(rows, rows[:64])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(straight, "memory", "topk"), make())
    with monkeypatch.context() as patch:
        if kill == "before_finishing":
            patch.setattr(Trainer, "_finish", _interrupt)
        elif kill == "before_the_config":
            patch.setattr(model, "atomic_write_text", _interrupt)
        else:
            save = SparseAutoencoder.save
            patch.setattr(SparseAutoencoder, "save", lambda *a, **k: _interrupt(save(*a, **k)))
        with pytest.raises(KeyboardInterrupt):
            train(_config(resumed, "memory", "topk"), make())
    summary = train(_config(resumed, "memory", "topk", resume=True), make())
    _assert_same_run(straight, resumed)
    assert summary["train"] == json.loads((straight / "summary.json").read_text())["train"]
    assert summary["train"]["fvu"] > 0
