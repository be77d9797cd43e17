"""SparseAutoencoder against direct formulas, and its save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch

from sae.errors import SaeError
from sae.train.model import SAEConfig, SparseAutoencoder, load_sae


def _sae(arch: str = "topk", k: int = 4, scale: float = 2.0) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_model=8, n_latents=32, k=k, arch=arch, input_scale=scale))
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    return sae


def test_encode_decode_match_dense_formula():
    sae = _sae()
    x = torch.randn(5, 8)
    pre = (x * 2.0 - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    torch.testing.assert_close(sae.pre_acts(x), pre)
    vals, idx = sae.encode(x)
    ref_vals, ref_idx = pre.topk(4, dim=1)
    torch.testing.assert_close(vals, ref_vals.relu())
    assert torch.equal(idx, ref_idx)
    dense = torch.zeros(5, 32).scatter(1, ref_idx, ref_vals.relu())
    torch.testing.assert_close(sae.encode_dense(x), dense)
    recon = (dense @ sae.W_dec + sae.b_dec) / 2.0
    torch.testing.assert_close(sae.reconstruct(x), recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(vals, idx), sae.decode_dense(dense), rtol=1e-5, atol=1e-5)


def test_threshold_mode_is_jumprelu():
    sae = _sae("batchtopk")
    sae.threshold.fill_(0.3)
    x = torch.randn(6, 8)
    pre = sae.pre_acts(x)
    dense = pre * (pre > 0.3)
    torch.testing.assert_close(sae.encode_dense(x, mode="threshold"), dense)
    vals, idx = sae.encode(x, mode="threshold")
    torch.testing.assert_close(sae.decode(vals, idx), sae.decode_dense(dense), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), sae.decode_dense(dense) / 2.0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["hierarchical", "jumprelu"])
def test_save_load_round_trip(tmp_path, arch):
    sae = _sae(arch)
    sae.save(tmp_path)
    loaded = load_sae(tmp_path)
    assert loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    # A train config.json (a superset of SAEConfig) loads too.
    data = json.loads((tmp_path / "config.json").read_text()) | {"lr": 1e-3, "batch": 64}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert load_sae(tmp_path).cfg == sae.cfg


def test_load_errors(tmp_path):
    with pytest.raises(SaeError, match="not an SAE directory"):
        load_sae(tmp_path)
    sae = _sae()
    sae.save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text()) | {"n_latents": 64}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(SaeError, match="does not match"):
        load_sae(tmp_path)
    with pytest.raises(SaeError, match="larger than the dictionary"):
        SAEConfig(d_model=8, n_latents=16, k=32, arch="topk").validate()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ({"n_latents": 10**12}, "does not match"),  # checked before anything is allocated
        ({"d_model": 10**13}, "does not match"),
    ],
)
def test_config_claiming_huge_sizes_is_refused_before_allocating(tmp_path, damage, message):
    _sae().save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text()) | damage
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(SaeError, match=message):
        load_sae(tmp_path)


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("W_enc", float("nan"), "W_enc holds NaN or infinite values"),
        ("b_dec", float("inf"), "b_dec holds NaN or infinite values"),
        ("W_dec", None, "W_dec is torch.int32, not a floating-point tensor"),
    ],
)
def test_weights_from_elsewhere_must_be_finite_floats(tmp_path, name, bad, message):
    from safetensors.torch import save_file

    tensors = {k: v.clone() for k, v in _sae().state_dict().items()}
    if bad is None:
        tensors[name] = tensors[name].to(torch.int32)
    else:
        tensors[name].view(-1)[0] = bad
    _sae().save(tmp_path)
    save_file(tensors, str(tmp_path / "sae.safetensors"))
    with pytest.raises(SaeError, match=message):
        load_sae(tmp_path)
