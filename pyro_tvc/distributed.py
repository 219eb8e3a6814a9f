"""Multi-process training: ``torchrun --nproc_per_node=K pyro-tvc train ...`` (docs/scale.md).

Each rank reads its shard of every global minibatch (the batch order is drawn by one seeded generator, the same on
every rank), computes the subsampled ELBO of its shard with the plate's ``num_data`` = the whole training split, and
the ranks sum their gradients weighted by shard size / global batch size. The result is the gradient of the
single-process estimator with the same global batch: ``(N / B) sum_i l_i`` for the per-input terms, and global terms
(the hierarchical model's KL of ``Lambda``) counted once. This is what ``DistributedDataParallel`` does for a module,
done on Pyro's parameter store (whose parameters are created lazily, under names, which DDP cannot wrap).

The process group is initialised from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``): gloo on CPU, NCCL on CUDA. Without that environment everything here is a no-op (one process).
Rank 0 alone writes run folders, checkpoints and results.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import pyro
from pyro.infer.util import zero_grads


_LOCAL = [False]


@contextlib.contextmanager
def local():
    """Inside, every rank trains alone (``world()`` is ``(0, 1)``): the benchmark gives each rank its own cells."""
    _LOCAL[0] = True
    try:
        yield
    finally:
        _LOCAL[0] = False


def world(device: torch.device | str = "cpu") -> tuple[int, int]:
    """``(rank, world_size)``; initialises the process group on first use under torchrun. ``(0, 1)`` otherwise,
    and inside :func:`local`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or _LOCAL[0]:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # a benchmark rank may wait hours at the final barrier for the others' cells; a failing rank is torn down
        # with the others by torchrun, so a long timeout does not hide errors
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def check_batch(batch_size: int, n_train: int, size: int) -> None:
    """Every rank must see data in the first step (Pyro creates parameters lazily, on first use).

    Raises:
        ValueError: ``--batch-size`` or the training split smaller than the number of processes.
    """
    if size > 1 and min(batch_size, n_train) < size:
        raise ValueError(f"--batch-size {batch_size} with {n_train} training inputs across {size} processes: each "
                         f"process needs at least one input per step; use a batch of >= {size}")


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun with CUDA, this rank's GPU (``LOCAL_RANK``); the given device otherwise."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shard(indices: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's share of a global minibatch (strided, so shard sizes differ by at most one)."""
    return indices[rank::size] if size > 1 else indices


def step(svi, weight: float, *args, **kwargs) -> float:
    """One SVI step whose gradient is summed over the ranks, each weighted by ``weight`` (its shard's share of the
    global batch; 0 for an empty shard). Returns the weighted loss summed over the ranks (the single-process loss of
    the global batch). Every parameter must exist already (see :func:`check_batch`)."""
    store = pyro.get_param_store()
    if weight > 0:
        loss = svi.loss_and_grads(svi.model, svi.guide, *args, **kwargs)
    else:  # an empty shard (a last batch smaller than the world): contribute nothing, but join every collective
        loss = 0.0
    params = [p for _, p in sorted(store.named_parameters())]  # the same parameters, in one order, on every rank
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.mul_(weight)
        dist.all_reduce(p.grad)
    total = torch.tensor([loss * weight], dtype=torch.float64, device=params[0].device if params else "cpu")
    dist.all_reduce(total)
    svi.optim(set(params))
    zero_grads(set(params))
    return float(total.item())
