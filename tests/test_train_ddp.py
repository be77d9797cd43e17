"""Two gloo ranks, each with half of every global batch, match one process on the whole batch."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from planted import planted_activations, planted_dictionary

from sae.train.checkpoint import checkpoint_path
from sae.train.config import TrainConfig
from sae.train.data import TensorSource
from sae.train.model import load_sae
from sae.train.trainer import METRICS_FILE, Trainer, train


def _config(out: Path, arch: str, options: dict) -> TrainConfig:
    return TrainConfig(
        cache="memory",
        out=str(out),
        k=4,
        arch=arch,
        n_latents=128,
        batch=128,
        tokens=128 * 12,
        lr=2e-3,
        dead_tokens=256,  # AuxK kicks in, so its all-reduced dead mask is exercised
        log_every=3,
        eval_every=0,
        checkpoint_every=5,
        progress=False,
        device="cpu",
        l0_coef=0.1,
        jumprelu_init_threshold=0.3,
        jumprelu_bandwidth=0.1,
        **options,
    )


def _source(quiet_rank: bool = False) -> TensorSource:
    """quiet_rank: rank 1's half of every global batch is scaled down 1000×, so under BatchTopK
    that rank keeps no activation at all and its SAE parameters get no gradient."""
    dictionary = planted_dictionary(48, 32)
    train = planted_activations(dictionary, 128 * 12)
    if quiet_rank:
        train = train.reshape(12, 2, 64, 32).clone()
        train[:, 1] *= 1e-3
        train = train.reshape(-1, 32)
    return TensorSource(train, planted_activations(dictionary, 256, seed=9))


def _worker(rank: int, port: int, out: str, arch: str, options: dict, quiet_rank: bool) -> None:
    """One torchrun-like rank: `train` joins the group from the environment and leaves it."""
    faulthandler.enable(all_threads=True)  # a rank that aborts shows where its threads were
    torch.set_num_threads(1)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()} | {"MASTER_ADDR": "127.0.0.1"})
    if rank == 1:  # checks --out late, as on a slow filesystem: rank 0 must wait to write there
        check = Trainer._check_out_dir

        def late_check(self: Trainer) -> None:
            time.sleep(1.0)
            check(self)

        Trainer._check_out_dir = late_check
    finish = Trainer._finish

    def keep_weights(self: Trainer, *args):  # every rank's final weights, to compare them
        save_file(self.sae.state_dict(), str(Path(out).parent / f"rank{rank}.safetensors"))
        return finish(self, *args)

    Trainer._finish = keep_weights
    train(_config(Path(out), arch, options), _source(quiet_rank))
    assert not dist.is_initialized(), "train() should leave the process group it created"
    # Left, and gone: a group that outlives destroy_process_group (something still holds it)
    # keeps its gloo threads until interpreter shutdown, where they abort now and then.
    assert not _gloo_threads(), "the process group outlived train(): its gloo threads still run"


def _gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo (Linux names them in /proc)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir()]
    return [n for n in names if "gloo" in n]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_lines(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    return [line for line in lines if line.get("split") != "heldout"]


@pytest.mark.parametrize(
    ("arch", "ranks_batchtopk", "options", "quiet_rank"),
    [
        ("hierarchical", None, {}, False),
        ("hierarchical", None, {"adam_state": "bfloat16"}, False),
        ("batchtopk", None, {}, False),
        ("batchtopk", "sparse", {}, False),
        ("batchtopk", "sparse", {}, True),
        ("jumprelu", None, {}, False),
    ],
    ids=[
        "hierarchical",
        "hierarchical-bf16-adam",
        "batchtopk",
        "batchtopk-sparse",
        "batchtopk-sparse-quiet-rank",
        "jumprelu",
    ],
)
def test_two_ranks_equal_one_process(
    tmp_path, arch, ranks_batchtopk, options, quiet_rank, monkeypatch
):
    """Weights and logged metrics (loss, FVU of the global batch, ℓ0) match.

    ranks_batchtopk="sparse": the ranks take BatchTopK's sparse path (global cut over
    per-row candidates, short rows decoded densely and the cut taken again on all ranks) while
    the single process keeps the dense one, so the two paths are compared too. quiet_rank: one
    rank keeps nothing, so only the other has gradients. bf16 Adam moments: the stochastic
    rounding must be the same on every rank."""
    single = tmp_path / "single"
    train(_config(single, arch, options), _source(quiet_rank))
    double = tmp_path / "double"
    if ranks_batchtopk:
        monkeypatch.setenv("SAE_BATCHTOPK", ranks_batchtopk)  # inherited by the spawned ranks
    args = (_free_port(), str(double), arch, options, quiet_rank)
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for name, tensor in ranks[0].items():  # the ranks hold the very same weights
        assert torch.equal(ranks[1][name], tensor), name
    a, b = load_sae(single), load_sae(double)
    # bf16 moments: a gradient summed in another order now and then rounds the other way
    tol = {"rtol": 1e-2, "atol": 1e-4} if options else {"rtol": 1e-4, "atol": 1e-5}
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], tensor, **tol)
    assert a.cfg.input_scale == b.cfg.input_scale
    one, two = _train_lines(single), _train_lines(double)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [3, 6, 9, 12]
    for key in ("loss", "fvu", "l0"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4), key
    saved = torch.load(checkpoint_path(double), weights_only=True)
    if ranks_batchtopk == "sparse" and not quiet_rank:  # some row was short of candidates on
        # some rank: the ranks took the cut again together, with that rank's dense rows, and
        # asked for more
        assert saved["batchtopk_candidates"] == 32
