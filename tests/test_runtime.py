"""torchrun's environment and --device, read the same way by every command."""

import pytest
import torch

from sae.errors import SaeError
from sae.runtime import RankInfo, rank_info, resolve_device, torchrun_barrier


def test_plain_run_is_rank_0_of_1(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert rank_info() == RankInfo(0, 1, 0)
    assert rank_info().is_main


def test_torchrun_environment_is_read(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = rank_info()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (3, 4, 1, False)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "environment variable RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 and WORLD_SIZE=2 are inconsistent"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK=0 and WORLD_SIZE=0 are inconsistent"),
    ],
)
def test_broken_environment_is_a_clear_error(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SaeError, match=message):
        rank_info()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")
def test_devices_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SaeError, match="--device cuda: no CUDA GPU is visible; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(SaeError, match="--device cuda:1: no CUDA GPU is visible"):
        resolve_device("cuda:1")
    with pytest.raises(SaeError, match="not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu9")
    with pytest.raises(SaeError, match="--device mps: not usable here"):
        resolve_device("mps")  # a valid device name, but no such device on this machine


def test_barrier_outside_torchrun_says_to_use_it(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SaeError, match="needs torchrun's MASTER_ADDR/MASTER_PORT; launch with"):
        torchrun_barrier()
