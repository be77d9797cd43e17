"""BatchTopK's global cut over two gloo ranks that hold different numbers of values."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae.runtime import RankInfo
from sae.train.distributed import global_threshold

VALUES = [torch.tensor([5.0, 1.0, 9.0]), torch.tensor([7.0, 3.0, 8.0, 2.0, 6.0, 4.0, 0.5])]


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        info = RankInfo(rank=rank, world_size=2, local_rank=rank)
        # rank 0 holds fewer values than n_keep = 5: it pads, and the shapes still agree
        results[rank] = [
            global_threshold(VALUES[rank], 5, info).item(),
            global_threshold(VALUES[rank], 20, info).item(),  # fewer than n_keep in all
        ]
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_cut_over_ranks_with_different_sizes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
        got = dict(results)
    everything = torch.cat(VALUES).sort(descending=True).values
    assert got[0] == got[1] == [everything[4].item(), float("-inf")]  # 5th largest: 6.0
