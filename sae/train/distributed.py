"""Data parallelism: torchrun ranks, one all-reduce of the gradients per step.

Every rank holds the same weights and reads its own share of the cache; averaging the gradients
makes a step equal to one process's step on the concatenated global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from sae.runtime import RankInfo, init_torchrun_group, rank_info


@contextmanager
def joined(device: str) -> Iterator[RankInfo]:
    """Join the torchrun job if there is one (NCCL on CUDA, gloo on CPU); else rank 0 of 1.

    A group created here is left after a finished run, behind a barrier: a rank that exits
    holding it can abort in gloo's threads during interpreter shutdown (SIGABRT after the work
    is done), and NCCL warns. A group the caller made (notebooks, scripts) stays theirs."""
    env = rank_info()
    if dist.is_available() and dist.is_initialized():
        yield RankInfo(dist.get_rank(), dist.get_world_size(), env.local_rank)
        return
    if env.world_size <= 1:
        yield RankInfo()
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(env.local_rank)
    init_torchrun_group("nccl" if device.startswith("cuda") else "gloo")
    info = RankInfo(dist.get_rank(), dist.get_world_size(), env.local_rank)
    barrier(info)  # creating the group is no sync point; make it one
    # An error propagates from here and the rank exits failing with its group held: tearing it
    # down could wait on peers that are still running.
    yield info
    barrier(info)  # nobody tears down its end while a peer still talks to it
    dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], info: RankInfo) -> None:
    """All-reduce the gradients as one flat buffer and divide by the world size.

    A parameter that got no gradient here takes part with zeros (in one process too, so world
    size changes nothing): under BatchTopK a batch (or one rank's share of it) can keep no
    activation at all, and ranks flattening different sets of gradients would all-reduce
    buffers of different sizes (gloo aborts, NCCL hangs or mixes them up).
    """
    for p in params:
        if p.grad is None and p.requires_grad:
            p.grad = torch.zeros_like(p)
    if info.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(flag: torch.Tensor, info: RankInfo) -> torch.Tensor:
    """Element-wise OR of a bool tensor over ranks (e.g. which latents fired anywhere)."""
    if info.world_size == 1:
        return flag
    as_int = flag.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.bool()


def max_over_ranks(value: int, info: RankInfo, device) -> int:
    """Largest of one integer across ranks (so every rank takes the same decision)."""
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj, info: RankInfo) -> list:
    """Every rank's JSON-like object, in rank order (each rank's reader cursor and RNG)."""
    if info.world_size == 1:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(t: torch.Tensor, info: RankInfo) -> torch.Tensor:
    """Element-wise sum of a tensor over ranks (logged metrics)."""
    if info.world_size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def min_over_ranks(t: torch.Tensor, info: RankInfo) -> torch.Tensor:
    """Element-wise minimum of a tensor over ranks."""
    if info.world_size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def global_threshold(local: torch.Tensor, n_keep: int, info: RankInfo) -> torch.Tensor:
    """The n_keep-th largest value of `local` over all ranks together (BatchTopK's cut).

    Only a rank's own n_keep largest values can be among the global n_keep largest, so each rank
    contributes those; the all-gather moves world_size · n_keep values, never whole batches.
    Ranks may hold different numbers of values (BatchTopK's sparse path adds the rows it took
    in full); those with fewer than n_keep pad with −inf, so when the ranks hold fewer than
    n_keep values in all the cut is −inf: everything is kept.
    """
    flat = local.reshape(-1)
    mine = flat.topk(min(n_keep, flat.numel()), sorted=False).values.float()
    if info.world_size == 1:
        return mine.min()
    if mine.numel() < n_keep:  # all_gather needs one size on every rank: pad with −inf
        mine = torch.cat([mine, mine.new_full((n_keep - mine.numel(),), float("-inf"))])
    everyone = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(everyone, mine)
    pool = torch.cat(everyone)
    return pool.topk(min(n_keep, pool.numel())).values.min()


def barrier(info: RankInfo) -> None:
    if info.world_size > 1:
        dist.barrier()
