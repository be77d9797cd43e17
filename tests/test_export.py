"""`sae export`: our format round-trips exactly; the SAELens layout matches its documented format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sae import load
from sae.cli import main
from sae.train.model import SAEConfig, SparseAutoencoder

D, F = 16, 40

TOPK_KEYS = {
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "k",
    "rescale_acts_by_decoder_norm",
    "metadata",
}
METADATA_KEYS = {
    "sae_lens_version",
    "sae_lens_training_version",
    "model_name",
    "model_class_name",
    "hook_name",
    "hook_head_index",
    "context_size",
    "prepend_bos",
    "seqpos_slice",
    "dataset_path",
    "model_from_pretrained_kwargs",
    "exclude_special_tokens",
    "neuronpedia_id",
}


def random_sae(arch: str, k: int = 6, scale: float = 0.37, seed: int = 0) -> SparseAutoencoder:
    """A trained-looking SAE: random unit decoder, random encoder and biases, an input scale."""
    cfg = SAEConfig(
        d_model=D,
        n_latents=F,
        k=k,
        arch=arch,
        input_scale=scale,
        model="tiny-gemma",
        layer=1,
        hook="blocks.1.hook_resid_post",
        context=128,
    )
    sae = SparseAutoencoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    sae.init_weights(gen)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(F, D, generator=gen))
        sae.b_enc.copy_(0.2 * torch.randn(F, generator=gen))
        sae.b_dec.copy_(torch.randn(D, generator=gen))
        if arch == "batchtopk":
            sae.threshold.fill_(0.4)
        if arch == "jumprelu":
            sae.threshold.copy_(0.5 * torch.rand(F, generator=gen))
    return sae


def inputs(n: int = 64) -> torch.Tensor:
    return 3.0 * torch.randn(n, D, generator=torch.Generator().manual_seed(7)) + 1.0


def saved_run(tmp_path, arch: str, **kw) -> tuple[SparseAutoencoder, str]:
    sae = random_sae(arch, **kw)
    run = tmp_path / f"run-{arch}"
    sae.save(run)
    return sae, str(run)


def export(run: str, out, *args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", run, str(out), *args])
    assert exit_info.value.code in (0, None)


@pytest.mark.parametrize("arch", ["hierarchical", "batchtopk", "jumprelu"])
def test_native_export_loads_back_identically(tmp_path, arch: str) -> None:
    sae, run = saved_run(tmp_path, arch)
    export(run, tmp_path / "ours", "--format", "sae")
    back = load(str(tmp_path / "ours"))
    x = inputs()
    mode = "threshold" if arch != "hierarchical" else "topk"
    assert torch.equal(back.reconstruct(x, mode=mode), sae.reconstruct(x, mode=mode))
    assert back.cfg == sae.cfg


def test_native_export_over_another_drops_its_eval_results(tmp_path) -> None:
    """--overwrite replaces an SAE: eval results of the one replaced must not stay beside it
    (a later SAELens export would attach its frequencies as this one's sparsity)."""
    from sae.eval.frequency import FREQUENCY_FILE

    a, run_a = saved_run(tmp_path, "hierarchical")
    export(run_a, tmp_path / "ours", "--format", "sae")
    evaluated(str(tmp_path / "ours"), a, "hierarchical")
    (tmp_path / "ours" / "eval.json").write_text("{}")
    _, run_b = saved_run(tmp_path, "batchtopk")
    export(run_b, tmp_path / "ours", "--format", "sae", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "config.json",
        "sae.safetensors",
    ]
    assert not (tmp_path / "ours" / FREQUENCY_FILE).exists()


def test_native_export_with_k_sets_the_default_budget(tmp_path) -> None:
    sae, run = saved_run(tmp_path, "hierarchical")
    export(run, tmp_path / "k3", "--format", "sae", "--k", "3")
    back = load(str(tmp_path / "k3"))
    assert back.cfg.k == 3
    assert torch.equal(back.reconstruct(inputs()), sae.reconstruct(inputs(), k=3))


def reference_saelens(tensors: dict, cfg: dict, x: torch.Tensor) -> tuple:
    """SAELens' documented encode/decode, written out from its format description."""
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    if cfg["architecture"] == "topk":
        vals, idx = pre.topk(cfg["k"], dim=1)
        latents = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
    else:
        latents = pre.relu() * (pre > tensors["threshold"])
    return latents, latents @ tensors["W_dec"] + tensors["b_dec"]


@pytest.mark.parametrize(
    ("arch", "args", "architecture", "k"),
    [
        ("hierarchical", [], "topk", 6),
        ("hierarchical", ["--k", "2"], "topk", 2),
        ("topk", [], "topk", 6),
        ("batchtopk", [], "jumprelu", None),
        ("jumprelu", [], "jumprelu", None),
    ],
)
def test_saelens_layout(tmp_path, arch, args, architecture, k) -> None:
    sae, run = saved_run(tmp_path, arch)
    out = tmp_path / "saelens"
    export(run, out, *args)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((out / "cfg.json").read_text())
    expected = (
        TOPK_KEYS if architecture == "topk" else TOPK_KEYS - {"k", "rescale_acts_by_decoder_norm"}
    )
    assert set(cfg) == expected
    assert set(cfg["metadata"]) == METADATA_KEYS
    assert cfg["architecture"] == architecture and cfg.get("k") == k
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == (D, F, "none")
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["model_name"] == "tiny-gemma"
    assert tuple(int(p) for p in meta["sae_lens_version"].split(".")) >= (6, 0, 0)
    tensors = load_file(str(out / "sae_weights.safetensors"))
    shapes = {"W_enc": (D, F), "b_enc": (F,), "W_dec": (F, D), "b_dec": (D,)}
    if architecture == "jumprelu":
        shapes["threshold"] = (F,)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == shapes
    assert torch.allclose(tensors["W_dec"].norm(dim=1), torch.ones(F), atol=1e-5)
    if arch == "batchtopk":
        assert torch.allclose(tensors["threshold"], torch.full((F,), 0.4 / 0.37))
    # The documented SAELens forward on model-space inputs gives our reconstruction.
    x = inputs()
    latents, recon = reference_saelens(tensors, cfg, x)
    mode = "threshold" if architecture == "jumprelu" else "topk"
    ours = sae.encode_dense(x, k=k, mode=mode) if mode == "topk" else sae.encode_dense(x, mode=mode)
    assert torch.allclose(latents, ours / 0.37, atol=1e-4)
    assert torch.allclose(recon, sae.reconstruct(x, k=k, mode=mode), atol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")  # sae_lens: how to load the LM
@pytest.mark.parametrize("arch", ["hierarchical", "batchtopk", "jumprelu"])
def test_saelens_loads_export(tmp_path, arch: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    sae, run = saved_run(tmp_path, arch)
    out = tmp_path / "saelens"
    export(run, out)
    loaded = sae_lens.SAE.load_from_disk(str(out))
    x = inputs()
    mode = "topk" if arch == "hierarchical" else "threshold"
    with torch.no_grad():
        latents = loaded.encode(x)
        recon = loaded.decode(latents)
    assert torch.allclose(latents, sae.encode_dense(x, mode=mode) / 0.37, atol=1e-4)
    assert torch.allclose(recon, sae.reconstruct(x, mode=mode), atol=1e-4)
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


def test_export_refuses_bad_input(tmp_path, capsys) -> None:
    (tmp_path / "notarun").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "notarun"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "is not an SAE directory" in capsys.readouterr().err
    _, run = saved_run(tmp_path, "topk")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", run, str(full)])
    assert exit_info.value.code == 2
    assert "is not empty" in capsys.readouterr().err
    assert (full / "keep.txt").read_text() == "x"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", run, str(tmp_path / "o"), "--format", "onnx"])
    assert "--format must be one of saelens, sae" in capsys.readouterr().err


def evaluated(run: str, sae: SparseAutoencoder, arch: str) -> dict:
    """Record firing frequencies in RUN the way `sae eval` does (its evaluator and writer)."""
    from sae.eval.evaluate import evaluate_sae, plan_settings
    from sae.eval.frequency import FREQUENCY_FILE, write_frequencies

    result = evaluate_sae(sae, [inputs(300)], plan_settings(arch, F, sae.cfg.k, [2, 6]))
    write_frequencies(result.frequencies, f"{run}/{FREQUENCY_FILE}", tokens=result.n_rows)
    return result.frequencies


@pytest.mark.parametrize(
    ("arch", "args", "label"),
    [
        ("hierarchical", [], "top-6"),
        ("hierarchical", ["--k", "2"], "top-2"),
        ("batchtopk", [], "threshold"),
    ],
)
def test_saelens_sparsity_from_eval_frequencies(tmp_path, capsys, arch, args, label) -> None:
    sae, run = saved_run(tmp_path, arch)
    freqs = evaluated(run, sae, arch)
    out = tmp_path / "saelens"
    export(run, out, *args)
    assert (
        f"sparsity.safetensors: {label} firing frequencies over 300 rows" in capsys.readouterr().out
    )
    sparsity = load_file(str(out / "sparsity.safetensors"))
    assert set(sparsity) == {"sparsity"} and sparsity["sparsity"].shape == (F,)
    assert torch.allclose(sparsity["sparsity"], torch.log10(freqs[label] + 1e-10))
    assert 0 < (freqs[label] > 0).sum() <= F  # some latents fired: a real measurement


def test_saelens_sparsity_missing_or_stale_or_bad(tmp_path, capsys) -> None:
    from sae.eval.frequency import FREQUENCY_FILE

    sae, run = saved_run(tmp_path, "hierarchical")
    out = tmp_path / "saelens"
    evaluated(run, sae, "hierarchical")
    export(run, out)
    assert (out / "sparsity.safetensors").is_file()
    # --k 3 was not evaluated: no sparsity file, and the stale one from the export above goes
    export(run, out, "--k", "3", "--overwrite")
    assert "no sparsity.safetensors" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    # a frequency file of another dictionary size is refused with what to do
    (tmp_path / "run-hierarchical" / FREQUENCY_FILE).unlink()
    from sae.eval.frequency import write_frequencies

    write_frequencies({"top-6": torch.zeros(F + 1)}, f"{run}/{FREQUENCY_FILE}", tokens=5)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", run, str(tmp_path / "o2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"not ({F},) float frequencies of this SAE" in err and "rerun `sae eval`" in err


def test_frequency_file_is_checked_as_untrusted_input(tmp_path) -> None:
    from safetensors.torch import save_file

    from sae.errors import SaeError
    from sae.eval.frequency import read_frequency, write_frequencies

    path = tmp_path / "f.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(SaeError, match=r"cannot read .*f\.safetensors .*rerun `sae eval`"):
        read_frequency(path, "top-6", F)
    write_frequencies({"top-6": torch.full((F,), 1.5)}, path, tokens=10)
    with pytest.raises(SaeError, match="top-6 holds values outside \\[0, 1\\]; delete it or rerun"):
        read_frequency(path, "top-6", F)
    save_file({"top-6": torch.zeros(F)}, str(path))  # no row count in the metadata
    with pytest.raises(SaeError, match="does not record how many rows were evaluated"):
        read_frequency(path, "top-6", F)
    write_frequencies({"top-6": torch.full((F,), 0.25)}, path, tokens=10)
    freq, rows = read_frequency(path, "top-6", F)
    assert rows == 10 and torch.equal(freq, torch.full((F,), 0.25))
