"""`sae harvest` end to end into real caches (CPU, tiny Gemma-2, stdlib docstrings as text)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from itertools import islice, pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from tinylm import make_tiny_lm

from sae.errors import SaeError
from sae.harvest.config import HarvestConfig
from sae.harvest.model import load_tokenizer
from sae.harvest.packing import pack_windows
from sae.harvest.pipeline import KILL_ENV, run_harvest
from sae.harvest.text import PythonDocsSource
from sae.store import open_cache

LAYER = 1
CONTEXT = 64
TOKENS = 4096 + 40  # not a multiple of CONTEXT: the last window is cut to honour the budget exactly
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_lm(tmp_path_factory.mktemp("tinylm")))


def base_config(model: str, out: str, **changes) -> HarvestConfig:
    config = HarvestConfig(
        model=model,
        layer=LAYER,
        tokens=TOKENS,
        out=out,
        dataset="python-docs",
        dataset_config=None,
        context=CONTEXT,
        batch_size=4,
        chunk_rows=64,
        shard_rows=256,
        progress=False,
    )
    return replace(config, **changes)


def cli_args(config: HarvestConfig) -> list[str]:
    return [
        "harvest",
        f"--model={config.model}",
        f"--layer={config.layer}",
        f"--tokens={config.tokens}",
        f"--out={config.out}",
        f"--dataset={config.dataset}",
        f"--context={config.context}",
        f"--batch-size={config.batch_size}",
        f"--chunk-rows={config.chunk_rows}",
        f"--shard-rows={config.shard_rows}",
        "--no-progress",
        *(["--overwrite"] if config.overwrite else []),
    ]


def cache_content(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cache = open_cache(url)
    n = cache.n_tokens
    return cache.read_rows(0, n), cache.token_ids(0, n), cache.positions(0, n)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One uninterrupted in-process harvest; other tests compare against its content."""
    out = str(tmp_path_factory.mktemp("ref") / "cache")
    report = run_harvest(base_config(tiny, out))
    return out, report


def test_cache_equals_hidden_states_of_the_windows(tiny, reference):
    from transformers import AutoModelForCausalLM

    out, report = reference
    assert report.committed == TOKENS and not report.exhausted
    acts, ids, positions = cache_content(out)
    cache = open_cache(out)
    assert cache.n_tokens == TOKENS and cache.d_model == 64
    assert cache.layer == LAYER and cache.hook == "blocks.1.hook_resid_post"
    assert cache.context == CONTEXT and cache.identity["dataset"] == "python-docs"

    tokenizer = load_tokenizer(tiny)
    n_windows = -(-TOKENS // CONTEXT)
    windows = list(islice(pack_windows(PythonDocsSource(), tokenizer, CONTEXT), n_windows))
    expected_ids = np.concatenate([w.ids for w in windows])[:TOKENS]
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(positions, np.tile(np.arange(CONTEXT), n_windows)[:TOKENS])
    assert (ids[positions == 0] == tokenizer.bos_token_id).all()

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        batch = torch.from_numpy(np.stack([w.ids for w in windows]).astype(np.int64))
        hidden = model(batch, output_hidden_states=True).hidden_states[LAYER + 1]
    expected = hidden.reshape(-1, 64)[:TOKENS].half().float().numpy()
    np.testing.assert_allclose(acts.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_resume_after_sigkill_equals_uninterrupted_run(tiny, reference, tmp_path):
    out = str(tmp_path / "cache")
    config = base_config(tiny, out)
    env = {**os.environ, KILL_ENV: "700"}
    killed = subprocess.run(
        [sys.executable, "-m", "sae", *cli_args(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert killed.returncode == -9, killed.stderr
    partial = open_cache(out).n_tokens
    assert 0 < partial < TOKENS
    report = run_harvest(config)  # the same command again, in-process: resumes
    assert report.resumed_from == partial and report.committed == TOKENS
    for got, want in zip(cache_content(out), cache_content(reference[0]), strict=True):
        np.testing.assert_array_equal(got, want)


def test_rerun_of_a_finished_cache_adds_nothing(tiny, reference, tmp_path):
    out = str(tmp_path / "cache")
    run_harvest(base_config(tiny, out, tokens=1000))
    report = run_harvest(base_config(tiny, out, tokens=1000))
    assert report.resumed_from == 1000 and report.committed == 1000
    acts, ids, _ = cache_content(out)
    ref_acts, ref_ids, _ = cache_content(reference[0])
    np.testing.assert_array_equal(ids, ref_ids[:1000])
    np.testing.assert_array_equal(acts, ref_acts[:1000])


def test_other_config_needs_overwrite(tiny, tmp_path):
    out = str(tmp_path / "cache")
    run_harvest(base_config(tiny, out, tokens=500))
    with pytest.raises(SaeError, match="layer"):
        run_harvest(base_config(tiny, out, tokens=500, layer=0))
    report = run_harvest(base_config(tiny, out, tokens=500, layer=0, overwrite=True))
    assert report.resumed_from == 0
    assert open_cache(out).layer == 0


def test_dataset_shorter_than_budget_stops_cleanly(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = str(tmp_path / "cache")
    report = run_harvest(base_config(tiny, out, dataset=str(data), tokens=100_000))
    assert report.exhausted and 0 < report.committed < 100_000
    cache = open_cache(out)
    assert cache.n_tokens == report.committed
    assert cache.read_rows(0, cache.n_tokens).shape == (report.committed, 64)
    # marked finished, so several writers' summary would count these rows (test_store.py)
    assert cache.records[0].finished and cache.attrs["tokens_committed"] == report.committed


def test_empty_dataset_is_an_error_and_writes_nothing(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.txt").write_text("")
    out = tmp_path / "cache"
    with pytest.raises(SaeError, match="holds no text"):
        run_harvest(base_config(tiny, str(out), dataset=str(data)))
    assert not out.exists()


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    from sae.cli import main

    cases = [
        (["--layer=7"], "has 3 blocks"),
        ([f"--model={tmp_path / 'missing'}"], "cannot load model"),
        ([f"--dataset={tmp_path / 'none.jsonl'}"], "no such file or folder"),
        (["--tokens=lots"], "--tokens"),
    ]
    for extra, message in cases:
        args = [*cli_args(base_config(tiny, str(tmp_path / "c"))), *extra]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_two_ranks_write_the_windows_of_one_process(tiny, reference, tmp_path):
    tokens = 4096  # 2 ranks x 2 token chunks of 16 x 64 rows: equal shares, whole windows
    config = base_config(tiny, str(tmp_path / "ranks"), tokens=tokens, chunk_rows=64, shard_rows=64)
    _torchrun_harvest(config)
    acts1, ids1, pos1 = (x[:tokens] for x in cache_content(reference[0]))
    acts2, ids2, pos2 = cache_content(config.out)
    assert len(ids2) == tokens
    # --overwrite with two ranks: they meet at a barrier once rank 0 has replaced the cache
    _torchrun_harvest(replace(config, overwrite=True))
    for before, after in zip((acts2, ids2, pos2), cache_content(config.out), strict=True):
        np.testing.assert_array_equal(before, after)
    # Same windows with the same activations (the ranks' rows come in another order).
    by_window1 = _acts_by_window(acts1, ids1, pos1)
    by_window2 = _acts_by_window(acts2, ids2, pos2)
    assert len(by_window1) == tokens // CONTEXT
    assert by_window1.keys() == by_window2.keys()
    for key, value in by_window1.items():
        np.testing.assert_array_equal(value, by_window2[key])


def _torchrun_harvest(config) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "sae"]
    result = subprocess.run(
        [*command, *cli_args(config)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _acts_by_window(acts, ids, positions) -> dict[tuple[int, ...], np.ndarray]:
    starts = [*np.flatnonzero(positions == 0).tolist(), len(ids)]
    return {tuple(ids[a:b].tolist()): acts[a:b] for a, b in pairwise(starts)}
