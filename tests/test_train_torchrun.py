"""`torchrun … -m sae train` as the README gives it, on CPU (gloo): two real ranks in
subprocesses, joined from torchrun's environment and left cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from planted import planted_activations, planted_dictionary, write_planted_cache

from sae.train.model import load_sae


def test_torchrun_two_ranks_train_from_a_cache(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    write_planted_cache(str(cache), planted_activations(planted_dictionary(32, 16), 64 * 24))
    args = ["--cache", str(cache), "--out", str(out), "--k", "4", "--latents", "64"]
    args += ["--batch", "64", "--tokens", "640", "--device", "cpu", "--no-progress"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    result = subprocess.run(
        [*launcher, "--nproc-per-node", "2", "-m", "sae", "train", *args, "--eval-tokens", "128"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["tokens"]) == (10, 640)
    assert load_sae(out).cfg.n_latents == 64
    # rank 0 alone logs: one training line and one held-out line for the last step
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("split")) for r in records] == [(10, None), (10, "heldout")]
