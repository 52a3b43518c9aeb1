"""Data parallelism across the processes `torchrun --nproc_per_node N` starts (gloo on CPU, nccl on GPU).

Why not the DistributedDataParallel wrapper: DDP all-reduces from hooks that fire while `.backward()`
accumulates into `.grad`, once per step. DOT takes two gradient sets from one forward with
torch.autograd.grad, which fires no such hooks (the reason mdistiller's DOT fails under DDP, its issue
#52). Reducing each gradient set explicitly is what DDP does underneath, and works for every trainer.

The contract every training loop keeps: N processes on a global batch make the same update as one
process on that batch. The recipe's batch_size is the global batch; each process takes a contiguous
share of every global batch, and gradients are combined weighted by each share's size, so uneven shares
(the last batch of an epoch) still give the global batch's mean gradient.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from compress.batches import batch_loader
from compress.data import make_loader


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_type: str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment; False (and nothing done) without one."""
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (results only rank 0 computes, such as the export's)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def reduce_gradients(grads: Sequence[torch.Tensor | None], share: float) -> None:
    """In place: each gradient becomes the sum over ranks of share_r * grad_r.

    `share` is this rank's fraction of the global batch and every gradient the mean over its own
    share, so the result is the global batch's mean gradient; with equal shares that is the plain
    average. Ranks run the same graph, so the same entries are None everywhere.
    """
    if not is_distributed():
        return
    _scaled_sum_([g for g in grads if g is not None], share)


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) across ranks.

    Each rank's BatchNorm normalises with its own share's batch statistics (as under DDP without
    SyncBatchNorm, which does not run on CPU), so running statistics drift apart; the average is
    a better estimate than any one rank's and leaves every rank with the same model for evaluation.
    Integer buffers (num_batches_tracked) already agree.
    """
    if not is_distributed():
        return
    _scaled_sum_([b for b in model.buffers() if b.is_floating_point()], 1.0 / world_size())


def _scaled_sum_(tensors: list[torch.Tensor], scale: float) -> None:
    """tensor <- sum over ranks of scale * tensor, for every tensor, in one flat all-reduce: a few large
    messages beat one per parameter."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors]).mul_(scale)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


@dataclass(frozen=True)
class Shard:
    indices: list[int]  # this rank's samples of one global batch
    start: int  # position of the first of them in the global batch
    batch_size: int  # size of the global batch

    @property
    def share(self) -> float:
        return len(self.indices) / self.batch_size


def epoch_shards(num_samples: int, batch_size: int, seed: int) -> list[Shard]:
    """This rank's part of every global batch of one epoch, in a seeded order shared by all ranks.

    With one process the batches are exactly those of make_loader(shuffle=True, seed=seed), so
    single-process training is unchanged by going through here.
    """
    # drawn through make_loader itself, so the order is the loader's by construction
    (order,) = next(iter(make_loader(TensorDataset(torch.arange(num_samples)), num_samples, shuffle=True, seed=seed)))
    world, me = world_size(), rank()
    shards = []
    for start in range(0, num_samples, batch_size):
        batch = order[start : start + batch_size]
        # a tail batch smaller than the world would leave some rank nothing to compute; all ranks skip it
        if len(batch) < world:
            continue
        parts = torch.tensor_split(batch, world)
        offset = sum(len(p) for p in parts[:me])
        shards.append(Shard(parts[me].tolist(), offset, len(batch)))
    return shards


def shard_loader(dataset: Dataset, shards: list[Shard]) -> DataLoader:
    """Batches of `dataset` holding exactly each shard's samples, in order."""
    return batch_loader(dataset, [s.indices for s in shards])
