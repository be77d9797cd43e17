"""`sae eval RUN --cache CACHE`: the held-out split of a real store, and refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae.cli import main
from sae.eval.evaluate import evaluate_sae, plan_settings
from sae.train.model import SAEConfig, SparseAutoencoder
from tests.planted import planted_activations, planted_dictionary, write_planted_cache

D, F = 16, 32


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("cache") / "planted.zarr")
    acts = planted_activations(planted_dictionary(24, D), 4096) + 0.25
    write_planted_cache(url, acts, chunk_rows=256)
    return url


def planted_run(tmp_path, **cfg) -> tuple[SparseAutoencoder, str]:
    fields = {"model": "planted", "layer": 0, "arch": "topk", "k": 4} | cfg
    sae = SparseAutoencoder(SAEConfig(d_model=D, n_latents=F, input_scale=0.5, **fields))
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec[:24] = planted_dictionary(24, D)
        sae.W_enc[:24] = planted_dictionary(24, D)
    run = tmp_path / "run"
    sae.save(run)
    return sae, str(run)


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code or 0


def test_eval_on_heldout_split(tmp_path, cache_url) -> None:
    from sae.store import open_cache

    sae, run = planted_run(tmp_path)
    code = run_cli(
        ["eval", run, "--cache", cache_url, "--k", "1,2,4,64", "--device", "cpu", "--batch", "100"]
    )
    assert code == 0
    doc = json.loads((tmp_path / "run" / "eval.json").read_text())
    cache = open_cache(cache_url)
    start, stop = cache.heldout_rows
    assert doc["tokens"] == stop - start > 0
    heldout = torch.from_numpy(cache.read_rows(start, stop)).float()
    expected = evaluate_sae(sae, [heldout], plan_settings("topk", F, 4, [1, 2, 4]))
    assert [r["k"] for r in doc["results"]] == [1, 2, 4]
    # the split is all there is: asking for more rows would not help
    assert doc["notes"] == [
        f"only {doc['tokens']} rows evaluated: almost-dead (< 1e-5) needs >= 100000 rows to "
        "differ from dead; this is all of the cache's held-out split (~1% of it, position 0 "
        "left out): a cache of 10,666,667 tokens or more has enough"  # context 16: 15/16 kept
    ]
    assert doc["skipped"] == ["k=64 skipped: larger than the dictionary (32 latents)"]
    for got, want in zip(doc["results"], expected.rows, strict=True):
        assert got["fvu"] == pytest.approx(want["fvu"], rel=1e-9)
        assert (got["l0"], got["dead"]) == (want["l0"], want["dead"])
    assert doc["top1_ev"] == pytest.approx(expected.top_ev(1), rel=1e-9)
    assert [r["l0"] for r in doc["results"]] == [1.0, 2.0, 4.0]
    # per-latent firing frequencies next to eval.json, one per setting, for `sae export`
    from sae.eval.frequency import FREQUENCY_FILE, read_frequency

    for row in doc["results"]:
        freq, rows = read_frequency(tmp_path / "run" / FREQUENCY_FILE, f"top-{row['k']}", F)
        assert rows == doc["tokens"]
        assert torch.allclose(freq, expected.frequencies[f"top-{row['k']}"])
        assert int((freq == 0).sum()) == row["dead"]
        assert freq.sum() * rows == pytest.approx(row["l0"] * rows)
    # fewer rows than the split holds: more can be asked for
    run_cli(["eval", run, "--cache", cache_url, "--k", "1", "--tokens", "100", "--device", "cpu"])
    notes = json.loads((tmp_path / "run" / "eval.json").read_text())["notes"]
    assert notes[0].endswith("pass --tokens 1M or more"), notes


def test_eval_refuses_a_cache_of_another_layer(tmp_path, cache_url, capsys) -> None:
    _, run = planted_run(tmp_path, layer=3, model="gemma-2-2b")
    assert run_cli(["eval", run, "--cache", cache_url, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not hold the SAE's inputs" in err
    assert "model 'planted' vs 'gemma-2-2b'" in err and "layer 0 vs 3" in err
    assert not (tmp_path / "run" / "eval.json").exists()


def test_eval_any_model_accepts_another_model_name_but_not_another_layer(
    tmp_path, cache_url, capsys
) -> None:
    """--any-model: a cache of the same model under another name (a local copy) is accepted."""
    _, run = planted_run(tmp_path, model="/models/local-copy")
    assert run_cli(["eval", run, "--cache", cache_url, "--device", "cpu", "--k", "1"]) == 2
    assert "or pass --any-model" in capsys.readouterr().err
    args = ["eval", run, "--cache", cache_url, "--device", "cpu", "--k", "1", "--any-model"]
    assert run_cli(args) == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["results"][0]["k"] == 1
    _, other_layer = planted_run(tmp_path / "b", layer=3, model="/models/local-copy")
    assert (
        run_cli(["eval", other_layer, "--cache", cache_url, "--device", "cpu", "--any-model"]) == 2
    )
    err = capsys.readouterr().err
    assert "layer 0 vs 3" in err and "--any-model" not in err


def test_eval_refuses_what_is_not_an_sae(tmp_path, cache_url, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert run_cli(["eval", str(tmp_path / "empty"), "--cache", cache_url]) == 2
    assert "is not an SAE directory" in capsys.readouterr().err
    _, run = planted_run(tmp_path)
    assert run_cli(["eval", run]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    assert run_cli(["eval", run, "--cache", cache_url, "--k", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["d_model"] = 8
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert run_cli(["eval", run, "--cache", cache_url]) == 2
    assert "does not match" in capsys.readouterr().err


def test_trained_run_eval_matches_trainer_and_exports(tmp_path, cache_url, capsys) -> None:
    """`sae train` → `sae eval` at the training k gives the trainer's held-out FVU; exports load."""
    from sae import load

    run = str(tmp_path / "trained")
    args = ["train", "--cache", cache_url, "--out", run, "--arch", "topk", "--k", "4"]
    args += ["--latents", "32", "--batch", "256", "--tokens", "2K", "--eval-tokens", "200"]
    assert run_cli([*args, "--no-progress", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "trained" / "summary.json").read_text())
    out = str(tmp_path / "eval.json")
    eval_args = ["eval", run, "--cache", cache_url, "--k", "4", "--tokens", "200", "--out", out]
    assert run_cli([*eval_args, "--device", "cpu"]) == 0
    row = json.loads((tmp_path / "eval.json").read_text())["results"][0]
    assert row["fvu"] == pytest.approx(summary["fvu"], rel=1e-4)
    # frequencies beside a --out elsewhere are named after it, so runs evaluated into one
    # folder keep their own; the run's own file is for its own eval.json
    assert (tmp_path / "eval.latent_frequency.safetensors").is_file()
    assert not (tmp_path / "latent_frequency.safetensors").exists()
    capsys.readouterr()
    assert run_cli([*eval_args[:-1], str(tmp_path), "--device", "cpu"]) == 2
    assert (
        f"--out {tmp_path} is a directory; give the JSON file to write" in capsys.readouterr().err
    )
    if Path("/proc/self").is_dir():  # nothing can be created under /proc, even by root
        assert run_cli([*eval_args[:-1], "/proc/no-eval/eval.json", "--device", "cpu"]) == 2
        assert "cannot write --out /proc/no-eval/eval.json" in capsys.readouterr().err
    assert (row["l0"], row["dead"]) == (summary["l0"], summary["dead"])
    assert run_cli(["export", run, str(tmp_path / "ours"), "--format", "sae"]) == 0
    x = torch.randn(8, D)
    assert torch.equal(load(str(tmp_path / "ours")).reconstruct(x), load(run).reconstruct(x))


def test_eval_refuses_a_cache_of_another_width(tmp_path, cache_url, capsys) -> None:
    sae = SparseAutoencoder(SAEConfig(d_model=8, n_latents=16, k=2, arch="topk", layer=0))
    sae.init_weights()
    sae.save(tmp_path / "narrow")
    assert run_cli(["eval", str(tmp_path / "narrow"), "--cache", cache_url]) == 2
    assert "d_model 16 vs 8" in capsys.readouterr().err
