"""The collectives of a tensor-parallel forward, over one ``torch.distributed`` process group.

NCCL on CUDA, gloo on CPU. The group is a process-group object of its own (not the default
group), so one process can build, close and build another (tests). Every op is issued on
the current stream with no host synchronization, so a decode forward that calls them can be
captured in a CUDA graph. NVLink multicast stays off: :data:`NO_MULTICAST_ENV` is set in the
environment of the engine process and of every worker it starts, and no multimem op is used.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F

from loraplex.engine.model.sharding import Shard

NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def no_multicast_env() -> None:
    """Set :data:`NO_MULTICAST_ENV` in this process's environment (inherited by children)."""
    os.environ.update(NO_MULTICAST_ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TPGroup:
    """One rank's view of the tensor-parallel group."""

    def __init__(
        self,
        shard: Shard,
        device: torch.device,
        *,
        port: int,
        timeout_s: float,
    ) -> None:
        self.shard = shard
        self.rank, self.size = shard.rank, shard.size
        self.device = device
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(
            "127.0.0.1", port, self.size, self.rank == 0, timeout=timeout, wait_for_workers=True
        )
        self.pg: dist.ProcessGroup
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(self.store, self.rank, self.size, opts)
        else:
            self.pg = dist.ProcessGroupGloo(self.store, self.rank, self.size, timeout)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place."""
        self.pg.allreduce([t]).wait()
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank, in place."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()
        return t

    def min_int(self, v: int) -> int:
        """The smallest of every rank's ``v`` (startup: sizes all ranks must agree on)."""
        t = torch.tensor([v], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([t], opts).wait()
        return int(t.item())

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding: this rank's rows of ``ids`` found in its slice of the
        table, the others zero, summed over the ranks. ``[T]`` -> ``[T, H]``."""
        n = table.shape[0]
        local = ids - self.rank * n
        outside = (local < 0) | (local >= n)
        x = F.embedding(local.masked_fill(outside, 0), table)
        x.masked_fill_(outside.unsqueeze(1), 0)
        return self.all_reduce(x)

    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits ``[N, V / size]`` -> ``[N, V]`` on rank 0 (the one that
        samples); the other ranks get their own slice back."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        local = local.contiguous()
        if self.rank != 0:
            self.pg.gather([], [local], opts).wait()
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self.pg.gather([parts], [local], opts).wait()
        return torch.cat(parts, dim=-1)

    def close(self) -> None:
        # a group whose peers are gone cannot be shut down collectively: drop it
        del self.pg
        del self.store
