"""Downstream fidelity: splicing an exact SAE changes nothing; a lossy one costs CE and KL."""

from __future__ import annotations

import json

import pytest
import torch
from tinylm import D_MODEL, tiny_gemma

from sae.cli import main
from sae.eval.evaluate import Setting
from sae.eval.lm import wrap_lm
from sae.eval.splice import splice_eval
from sae.train.model import SAEConfig, SparseAutoencoder

D = D_MODEL


class RecordingSAE(SparseAutoencoder):
    """An SAE that remembers what it was asked to encode (to check the hook site)."""

    seen: list[torch.Tensor]

    def center(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return super().center(x)


def exact_sae(layer: int, scale: float = 1.0) -> RecordingSAE:
    """±e_i dictionary: top-64 of 128 latents reconstructs any x exactly (|x_i| on ±e_i)."""
    sae = RecordingSAE(
        SAEConfig(d_model=D, n_latents=2 * D, k=D, arch="topk", layer=layer, input_scale=scale)
    )
    sae.seen = []
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(torch.cat([eye, -eye]))
    return sae


def test_exact_reconstruction_gives_zero_ce_increase_and_kl() -> None:
    lm = tiny_gemma(n_layers=2)
    layer = 0
    wrapped = wrap_lm(lm, None, layer, D, "cpu")
    sae = exact_sae(layer, scale=0.5)  # a power of two keeps the scaling exact
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 16), generator=gen)
    ids[:, 0] = 2  # BOS
    rows = splice_eval(
        lm,
        wrapped.block,
        sae,
        [ids[:2], ids[2:]],
        [Setting("topk", D), Setting("topk", 1)],
    )
    exact, lossy = rows
    assert exact["ce_increase"] == 0.0 and exact["kl"] == 0.0
    assert exact["predictions"] == 3 * 15 and exact["ce_clean"] > 0
    assert exact["ce_zero_ablation"] > exact["ce_clean"] and exact["ce_recovered"] == 1.0
    assert lossy["kl"] > 1e-4 and abs(lossy["ce_increase"]) > 1e-4  # random LM: either sign
    assert lossy["l0"] == 1.0
    # The SAE saw the residual stream after block `layer`: hidden_states[layer + 1].
    with torch.no_grad():
        hidden = lm(input_ids=ids[:2], output_hidden_states=True).hidden_states[layer + 1]
    assert torch.equal(sae.seen[0], hidden.reshape(-1, D))


def test_position_0_is_left_clean_whatever_token_it_holds() -> None:
    """As in the cache, which drops position-0 rows: a window that starts without BOS keeps its
    first row clean, and a BOS later in a window (a document boundary) is spliced."""
    lm = tiny_gemma(n_layers=2)
    wrapped = wrap_lm(lm, None, 0, D, "cpu")
    ids = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    ids[:, 7] = 2  # a BOS mid-window; position 0 holds an ordinary token
    (row,) = splice_eval(lm, wrapped.block, exact_sae(0), [ids], [Setting("topk", 1)])
    assert row["spliced_rows"] == 3 * 15


def test_model_must_fit_the_sae() -> None:
    from sae.errors import SaeError

    lm = tiny_gemma(n_layers=2)
    with pytest.raises(SaeError, match="has 2 blocks"):
        wrap_lm(lm, None, 5, D, "cpu")
    with pytest.raises(SaeError, match="hidden size is 64 but the SAE's d_model is 32"):
        wrap_lm(lm, None, 1, 32, "cpu")


def test_eval_command_downstream(tmp_path) -> None:
    from tests.tinylm import make_tiny_lm, stdlib_texts

    model_dir = make_tiny_lm(tmp_path / "lm", n_layers=2)
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(stdlib_texts(20)))
    sae = exact_sae(layer=1)
    sae.cfg.model, sae.cfg.context = str(model_dir), 32
    run = tmp_path / "run"
    sae.save(run)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "eval",
                str(run),
                "--model",
                str(model_dir),
                "--text",
                str(text),
                "--k",
                f"1,{D}",
                "--text-tokens",
                "512",
                "--device",
                "cpu",
            ]
        )
    assert exit_info.value.code in (0, None)
    doc = json.loads((run / "eval.json").read_text())
    rows = {row["k"]: row for row in doc["downstream"]}
    assert rows[D]["ce_increase"] == 0.0 and rows[D]["kl"] == 0.0
    assert rows[D]["predictions"] == 16 * 31
    assert rows[1]["kl"] > 0 and rows[1]["ce_increase"] != 0


def test_gguf_file_option(tmp_path) -> None:
    from sae.errors import SaeError
    from sae.eval.lm import model_source

    with pytest.raises(SaeError, match=r"--gguf-file m\.gguf: no such file"):
        model_source(str(tmp_path), "m.gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert model_source(str(tmp_path), "m.gguf") == str(tmp_path / "m.gguf")
    assert model_source("google/gemma-2-2b", None) == "google/gemma-2-2b"
