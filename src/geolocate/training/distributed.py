"""Data-parallel training under ``torchrun`` (open_clip's ``distributed.py`` in spirit).

``torchrun --nproc_per_node N -m geolocate train ...`` starts N processes with ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` set; :func:`init_distributed` joins them into one process group (gloo on the CPU, nccl on CUDA,
each rank on ``cuda:<LOCAL_RANK>``). The loop then gives every rank the same global permutation and batch and
each rank takes its share of every batch (``shard``: rows ``rank::world``, the DistributedSampler split, but per
batch so the global batch is exactly the one-process batch). Each rank's loss is scaled by its share of the global
batch and the gradients are summed over ranks (``all_reduce_grads``) before clipping and the optimizer step, so
the weights follow the one-process run at the same global batch size up to float summation order (exactly for the
mean losses ``ce`` and ``geo`` without class weights; with class weights each shard normalises by its own weights,
and dropout masks are drawn per rank). Every rank evaluates the full validation split with the same weights, so
early stopping decides alike everywhere; only rank 0 writes files, promotes and prints.
"""
from __future__ import annotations

import dataclasses as dc
import datetime as dt
import os
from typing import Any, Iterable

import torch
import torch.distributed as dist


@dc.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistEnv:
    """This process's place in the process group (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistEnv()


def launched() -> bool:
    """True when started by torchrun (or anything that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto", timeout_s: float = 4 * 3600) -> DistEnv:
    """Join the torchrun process group once (a no-op in a single process); gloo on CPU, nccl on CUDA.

    ``timeout_s`` bounds collective waits: rank 0 may extract embeddings while the others wait at a barrier.
    """
    if not launched() or not dist.is_available():
        return current()
    if not dist.is_initialized():
        from .precision import resolve_device

        dev = resolve_device(device)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(name: str, env: DistEnv) -> torch.device:
    """``train.device`` for this rank: CUDA ranks each get ``cuda:<local rank>``."""
    from .precision import resolve_device

    dev = resolve_device(name)
    if dev.type == "cuda" and env.enabled:
        return torch.device("cuda", env.local_rank)
    return dev


def shard(idx: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """This rank's rows of one global batch (every ``world_size``-th, from ``rank``)."""
    return idx[env.rank::env.world_size] if env.enabled else idx


def all_reduce_grads(params: Iterable[torch.nn.Parameter], env: DistEnv) -> None:
    """Sum the gradients over ranks, in one flat buffer (a rank with an empty share contributes zeros)."""
    if not env.enabled:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    if not env.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank, so every rank evaluates the same model."""
    if not env.enabled:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)


def quiet_unless_main(env: DistEnv) -> None:
    """Ranks other than 0 print no progress and no messages (warnings and errors still go to stderr)."""
    if env.is_main:
        return
    from ..progress import console

    os.environ["GEOLOCATE_PROGRESS"] = "0"
    console.quiet = True


def main_first(env: DistEnv, fn):
    """``fn()`` on rank 0 first (it fills the caches, writing), then on the other ranks (which then only read)."""
    out = fn() if env.is_main else None
    barrier(env)
    return out if env.is_main else fn()
