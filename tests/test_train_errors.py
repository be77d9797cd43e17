"""Each bad input to `sae train` stops with a message that says what to do."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from planted import CrashAfter, planted_activations, planted_dictionary, write_planted_cache

from sae.errors import SaeError
from sae.kernels import triton_ops
from sae.train.checkpoint import checkpoint_path, load_checkpoint
from sae.train.config import MAX_SPARSE_K, TrainConfig
from sae.train.data import TensorSource
from sae.train.model import load_sae
from sae.train.trainer import train


def _config(out: Path, **overrides) -> TrainConfig:
    base = {
        "cache": "memory",
        "out": str(out),
        "k": 4,
        "arch": "topk",
        "n_latents": 64,
        "batch": 64,
        "eval_every": 0,
        "log_every": 5,
        "checkpoint_every": 10,
        "progress": False,
        "device": "cpu",
    }
    return TrainConfig(**(base | overrides))


def _source(d_model: int = 16, n: int = 64 * 20) -> TensorSource:
    dictionary = planted_dictionary(32, d_model)
    return TensorSource(planted_activations(dictionary, n), planted_activations(dictionary, 64))


def test_missing_cache(tmp_path):
    with pytest.raises(SaeError, match=r"no cache at .*nope.*sae harvest"):
        train(_config(tmp_path / "run", cache=str(tmp_path / "nope")))


def test_cache_given_with_a_tilde(tmp_path, monkeypatch):
    """`--cache=~/c` reaches us unexpanded (bash expands only a word that starts with ~)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_planted_cache(str(tmp_path / "c"), planted_activations(planted_dictionary(32, 16), 640))
    summary = train(_config(tmp_path / "run", cache="~/c", tokens=64 * 2))
    assert summary["steps"] == 2


def test_cache_that_is_all_heldout_says_why(tmp_path):
    """A harvest that stopped (or ran out of text) far short of the size its cache was created
    for: the held-out split, ~1% of that size, holds every row written."""
    url = str(tmp_path / "cache")
    rows = planted_activations(planted_dictionary(32, 16), 640)
    write_planted_cache(url, rows, chunk_rows=64, total_tokens=640_000)
    with pytest.raises(
        SaeError,
        match=r"no training tokens: all 640 of its rows are the held-out split \(rows \[0, 640\), "
        r"sized for the 640000 tokens .*Harvest the rest .*--tokens at most",
    ):
        train(_config(tmp_path / "run", cache=url))


@pytest.mark.parametrize(
    ("arch", "option", "value"), [("topk", "k", 1025), ("batchtopk", "aux_k", 2048)]
)
def test_widths_beyond_the_sparse_kernels(tmp_path, arch, option, value):
    """--k and --aux-k beyond what the kernels take per token are refused before training (the
    GPU used to fail in the first backward, or at the first step with 1,025 dead latents), on
    the CPU as well; BatchTopK's own k is not bounded (its rows are cut into pieces)."""
    with pytest.raises(
        SaeError, match=rf"--{option.replace('_', '-')} {value} is more .* \(1024\)"
    ):
        train(_config(tmp_path / "run", arch=arch, **{option: value}), _source())
    config = _config(tmp_path / "ok", arch="batchtopk", k=2000, aux_k=1024)
    config.validate_options()
    assert MAX_SPARSE_K == triton_ops.MAX_K


def test_k_larger_than_dictionary(tmp_path):
    with pytest.raises(SaeError, match="--k 100 is larger than the dictionary \\(64 latents\\)"):
        train(_config(tmp_path / "run", k=100), _source())


def test_latents_and_expansion_together(tmp_path):
    with pytest.raises(SaeError, match="either --latents or --expansion"):
        train(_config(tmp_path / "run", expansion=4), _source())


def test_unknown_encoder_dtype(tmp_path):
    with pytest.raises(
        SaeError, match="--encoder-dtype must be one of bfloat16, float32, got 'fp8'"
    ):
        train(_config(tmp_path / "run", encoder_dtype="fp8"), _source())


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "arch",
            "relu",
            "--arch must be one of hierarchical, topk, batchtopk, jumprelu, got 'relu'",
        ),
        ("b_dec_init", "zero", "--b-dec-init must be one of median, mean, got 'zero'"),
    ],
)
def test_unknown_choice(tmp_path, option, value, message):
    with pytest.raises(SaeError, match=message):
        train(_config(tmp_path / "run", **{option: value}), _source())


def test_unknown_adam_state(tmp_path):
    with pytest.raises(
        SaeError, match="--adam-state must be one of float32, bfloat16, got 'float16'"
    ):
        train(_config(tmp_path / "run", adam_state="float16"), _source())


def test_bf16_adam_state_trains_and_resumes_either_way(tmp_path):
    """bf16 moments are stored as bf16, and a run may switch the option when it resumes."""
    first = train(_config(tmp_path / "run", tokens=64 * 10, adam_state="bfloat16"), _source())
    state = load_checkpoint(tmp_path / "run")["optimizer"]["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.bfloat16}
    assert first["fvu"] < 1.0
    summary = train(_config(tmp_path / "run", tokens=64 * 20, resume=True), _source())
    assert summary["steps"] == 20 and summary["fvu"] == summary["fvu"]
    state = load_checkpoint(tmp_path / "run")["optimizer"]["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.float32}


def test_read_workers_must_be_positive(tmp_path):
    with pytest.raises(SaeError, match="--read-workers must be >= 1, got 0"):
        train(_config(tmp_path / "run", read_workers=0), _source())


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    train(_config(tmp_path / "run", tokens=64 * 2), _source())
    with pytest.raises(SaeError, match="already holds a run; pass --resume"):
        train(_config(tmp_path / "run", tokens=64 * 2), _source())
    # eval results of the SAE being replaced must not outlive it
    (tmp_path / "run" / "eval.json").write_text("{}")
    (tmp_path / "run" / "latent_frequency.safetensors").write_bytes(b"old")
    # nor its weights, under this run's config, should this run be killed before it finishes
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path / "run", tokens=64 * 3, overwrite=True), CrashAfter(_source(), 2))
    assert not (tmp_path / "run" / "eval.json").exists()
    assert not (tmp_path / "run" / "latent_frequency.safetensors").exists()
    with pytest.raises(SaeError, match=r"sae\.safetensors"):
        load_sae(tmp_path / "run")
    summary = train(_config(tmp_path / "run", tokens=64 * 3, overwrite=True), _source())
    assert summary["steps"] == 3


def test_d_model_mismatch_with_checkpoint(tmp_path):
    train(_config(tmp_path / "run", tokens=64 * 10), _source(d_model=16))
    with pytest.raises(SaeError, match=r"the cache has d_model 24 but the run .* d_model 16"):
        train(_config(tmp_path / "run", resume=True), _source(d_model=24))


def test_resume_with_changed_options(tmp_path):
    train(_config(tmp_path / "run", tokens=64 * 10), _source())
    with pytest.raises(SaeError, match=r"different options .*k \(4 → 8\)"):
        train(_config(tmp_path / "run", resume=True, k=8), _source())


def test_resume_without_a_run(tmp_path):
    with pytest.raises(SaeError, match="holds no run; start it without --resume"):
        train(_config(tmp_path / "run", resume=True), _source())


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    source = _source()
    source.train[64 * 14 + 3, 0] = float("nan")  # a bad row in the batch of step 15
    with pytest.raises(SaeError, match=r"NaN/inf at step 15; the last good checkpoint \(step 10\)"):
        train(_config(tmp_path / "run"), source)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == 10
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert checkpoint_path(tmp_path / "run").is_file()
    # Resuming from the good checkpoint past the bad batch is possible once the data is fixed.
    source.train[64 * 14 + 3, 0] = 0.0
    summary = train(_config(tmp_path / "run", resume=True), source)
    assert summary["steps"] == 20


def test_foreign_cache(tmp_path):
    import zarr

    foreign = tmp_path / "foreign"
    zarr.open_group(str(foreign), mode="w").attrs["format"] = "someone-elses"
    with pytest.raises(SaeError, match="is not an sae activation cache"):
        train(_config(tmp_path / "run", cache=str(foreign)))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a cache")
    with pytest.raises(SaeError, match="is not an sae activation cache"):
        train(_config(tmp_path / "run", cache=str(plain)))


def test_out_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(SaeError, match="is a file; pass a directory"):
        train(_config(afile), _source())
    with pytest.raises(SaeError, match=r"cannot be created: .*afile is a file"):
        train(_config(afile / "run"), _source())
    assert afile.read_text() == "mine"
    if Path("/proc/self").is_dir():  # nothing can be created under /proc, even by root
        with pytest.raises(SaeError, match="cannot create --out /proc/no-run-here: "):
            train(_config(Path("/proc/no-run-here")), _source())


@pytest.mark.parametrize(
    ("option", "value", "flag"),
    [
        ("aux_coef", float("nan"), "--aux-coef"),  # NaN > 0 is false: AuxK would be off
        ("l0_coef", -1.0, "--l0-coef"),
        ("jumprelu_bandwidth", 0.0, "--bandwidth"),
        ("jumprelu_bandwidth", float("inf"), "--bandwidth"),
        ("jumprelu_init_threshold", -1.0, "jumprelu_init_threshold"),
    ],
)
def test_coefficients_must_be_finite(tmp_path, option, value, flag):
    with pytest.raises(SaeError, match=f"{flag} must be a finite number"):
        train(_config(tmp_path / "run", **{option: value}), _source())


def test_foreign_or_damaged_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(_config(run, tokens=64 * 10), _source())
    saved = load_checkpoint(run)
    torch.save({"model": saved["model"], "step": 3}, checkpoint_path(run))
    with pytest.raises(SaeError, match=r"not a checkpoint of `sae train` \(it lacks optimizer"):
        train(_config(run, resume=True), _source())
    torch.save(saved | {"cursors": "not a list"}, checkpoint_path(run))
    with pytest.raises(SaeError, match=r"cannot resume from .*damaged .* --overwrite"):
        train(_config(run, resume=True), _source())
    torch.save(saved, checkpoint_path(run))
    assert train(_config(run, resume=True), _source())["steps"] == 20  # it extends


def test_cache_that_does_not_say_its_layer_or_context(tmp_path):
    """Provenance a cache leaves out (another tool wrote it) is recorded as unknown."""
    url = tmp_path / "cache"
    rows = planted_activations(planted_dictionary(32, 16), 64 * 6)
    write_planted_cache(str(url), rows, chunk_rows=64)
    meta = json.loads((url / "zarr.json").read_text())
    del meta["attributes"]["identity"]["layer"]
    meta["attributes"]["identity"]["context"] = None
    (url / "zarr.json").write_text(json.dumps(meta))
    train(_config(tmp_path / "run", cache=str(url), tokens=64 * 2))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["layer"], saved["context"], saved["model"]) == (-1, 0, "planted")


def test_options_the_arch_does_not_use_are_named():
    config = lambda **kw: TrainConfig(cache="c", out="o", **kw)
    assert config(arch="topk", loss_every=4, l0_coef=0.5).ignored_options() == [
        "--loss-every",
        "--l0-coef",
    ]
    assert config(arch="hierarchical", loss_every=4).ignored_options() == []
    assert config(arch="jumprelu", k=0, l0_coef=0.5, aux_k=8).ignored_options() == ["--aux-k"]


@pytest.mark.parametrize("momentum", [1.0, -0.5, float("nan")])
def test_theta_momentum_is_a_fraction(tmp_path, momentum):
    with pytest.raises(SaeError, match=r"theta_momentum must be in \[0, 1\)"):
        train(_config(tmp_path / "run", arch="batchtopk", theta_momentum=momentum), _source())
