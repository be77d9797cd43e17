"""Where this process runs: its torchrun rank (RANK, WORLD_SIZE, LOCAL_RANK) and its device.

One place for both so that harvest, train, eval and demo agree on what `--device cuda` means
under torchrun (this rank's GPU) and reject a broken environment with the same message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sae.errors import SaeError


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SaeError(f"environment variable {name}={value!r} is not an integer") from None


def rank_info() -> RankInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (a plain run is rank 0 of 1)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise SaeError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent")
    return RankInfo(rank, world, local)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> this process's GPU (LOCAL_RANK under torchrun) if there is one, else CPU.

    ``cuda`` without an index also means this process's GPU.
    """
    if device in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", rank_info().local_rank)
        if device == "cuda":
            raise SaeError("--device cuda: no CUDA GPU is visible; use --device cpu")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaeError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise SaeError(
            f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    try:  # a valid name is not a usable device (mps on Linux, cuda:7 on a 1-GPU machine)
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SaeError(
            f"--device {device}: not usable here ({first}); use auto, cpu or cuda"
        ) from None
    return resolved


def init_torchrun_group(backend: str) -> None:
    """init_process_group from torchrun's environment, after importing torch._dynamo.

    Imported while a group exists (the optimizer's first step imports it), torch._dynamo keeps
    references to that group which destroy_process_group does not drop, so the group and its
    gloo threads live on until interpreter shutdown, where tearing them down aborts now and then
    (SIGABRT, "terminate called without an active exception")."""
    import importlib

    import torch.distributed as dist

    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend)


def torchrun_barrier() -> None:
    """Wait once for every torchrun rank: a gloo group joined and left around one barrier.

    For the rare point where ranks that otherwise need no process group must agree (harvest's
    --overwrite: nobody opens the cache until rank 0 has replaced it)."""
    import torch.distributed as dist

    if not (dist.is_available() and os.environ.get("MASTER_ADDR")):
        raise SaeError(
            "several ranks must agree here, which needs torchrun's MASTER_ADDR/MASTER_PORT; "
            "launch with torchrun"
        )
    init_torchrun_group("gloo")
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
