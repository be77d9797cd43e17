"""`sae plot`: a readable six-panel PNG of the expected size from eval.json files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from sae.cli import main
from sae.eval.evaluate import evaluate_sae, plan_settings
from sae.eval.pipeline import eval_document, read_eval, write_json
from sae.eval.plot import DPI, FIGSIZE
from sae.train.model import SAEConfig, SparseAutoencoder
from tests.planted import planted_activations, planted_dictionary


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def evaluated_run(tmp_path, name: str, arch: str, k: int, seed: int) -> str:
    """An SAE whose decoder is the planted dictionary (plus noise rows), evaluated on planted data."""
    dictionary = planted_dictionary(48, 32)
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randn(16, 32, generator=gen)
    W = torch.cat([dictionary, extra / extra.norm(dim=1, keepdim=True)])
    sae = SparseAutoencoder(SAEConfig(d_model=32, n_latents=64, k=k, arch=arch, layer=1))
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W + 0.05 * torch.randn(W.shape, generator=gen))
        sae.threshold.fill_(0.5 if arch == "batchtopk" else 0.0)
    run = tmp_path / name
    sae.save(run)
    x = planted_activations(dictionary, 2000, active=4, seed=seed)
    result = evaluate_sae(sae, x.split(500), plan_settings(arch, 64, k, None))
    write_json(eval_document(str(run), sae, "memory://planted", result), run / "eval.json")
    return str(run)


def test_plot_writes_readable_png(tmp_path) -> None:
    runs = [
        evaluated_run(tmp_path, "hier-K8", "hierarchical", 8, 1),
        evaluated_run(tmp_path, "topk-k4", "topk", 4, 2),
        evaluated_run(tmp_path, "btk-k4", "batchtopk", 4, 3),
    ]
    doc = read_eval(runs[0])
    assert doc["sae"]["arch"] == "hierarchical" and doc["tokens"] == 2000
    assert [r["k"] for r in doc["results"]] == [1, 2, 4, 8, 16, 32, 64]
    out = tmp_path / "figs" / "fig.png"
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", *runs, "--out", str(out)])
    assert exit_info.value.code in (0, None)
    assert out.stat().st_size > 20_000
    assert png_size(out) == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def test_plot_refuses_run_without_eval(tmp_path, capsys) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "f.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "has no eval.json" in err and "sae eval" in err
    assert not (tmp_path / "f.png").exists()


def test_downstream_merges_into_eval_json_and_plots(tmp_path) -> None:
    from sae import load
    from sae.eval.pipeline import merge_previous

    run = evaluated_run(tmp_path, "hier-K8", "hierarchical", 8, 1)
    before = read_eval(run)
    downstream = [
        {
            "mode": "topk",
            "k": k,
            "l0": float(k),
            "ce_clean": 2.0,
            "ce_spliced": 2.0 + 1 / k,
            "ce_increase": 1 / k,
            "kl": 0.5 / k,
            "predictions": 100,
        }
        for k in (1, 2, 4, 8)
    ]
    doc = eval_document(run, load(run), None, None) | {"downstream": downstream}
    merged = merge_previous(doc, f"{run}/eval.json")
    assert merged["results"] == before["results"] and merged["downstream"] == downstream
    write_json(merged, f"{run}/eval.json")
    out = tmp_path / "down.png"
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", run, "--out", str(out)])
    assert exit_info.value.code in (0, None)
    assert png_size(out) == (1500, 900)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"sae": {}, "results": []}, "sae.arch or sae.k is missing"),
        ({"sae": {"arch": "topk", "k": 4}, "results": [3]}, r"results\[0\] is not a result row"),
        ({"sae": {"arch": "topk", "k": 4}, "results": [{"mode": "topk"}]}, "lacks one of mode"),
        (
            {"sae": {"arch": "topk", "k": 4}, "results": [],
             "histograms": {"log10_frequency": {"edges": [0, 1], "counts": [1, 2, 3]}}},
            "3 counts for 2 edges",
        ),
    ],
)  # fmt: skip
def test_plot_refuses_a_damaged_eval_json(tmp_path, doc, message) -> None:
    from sae.errors import SaeError
    from sae.eval.pipeline import read_eval

    path = tmp_path / "eval.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SaeError, match=message):
        read_eval(path)
