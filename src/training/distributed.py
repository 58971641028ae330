"""Data-parallel training on PyTorch's own engines: DDP, or FSDP2 (``fully_shard``).

``torchrun --nproc_per_node=N train.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; we join the
process group (NCCL on CUDA, gloo on CPU) and wrap the model. The model file knows nothing of
this. Each rank reads its own share of every global batch (src/training/batches.py), so N ranks
with micro-batch B train exactly like one process with micro-batch N*B.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a 1-process info."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world)


def shutdown_distributed(together: bool = False) -> None:
    """Leave the process group. ``together`` (after a run that ended normally on every rank):
    wait for the other ranks first, since a rank that tears gloo down while another is still
    sending can abort that one at exit ("terminate called without an active exception").
    Not after an error: the other ranks may never arrive."""
    if dist.is_available() and dist.is_initialized():
        try:
            if together:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, fsdp: bool = False) -> nn.Module:
    """DDP-wrap ``model`` (returns the wrapper), or shard it in place with FSDP2 (returns it).

    Build the optimiser after this call: with FSDP2 the parameters become sharded DTensors.
    """
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # Shard each block, then the root (embedding, final norm, head): one all-gather per block.
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, active: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for all but the last micro-batch of gradient accumulation."""
    if not active:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging the same loss on every rank)."""
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def broadcast_str(text: str, info: DistInfo, device: torch.device) -> str:
    """Rank 0's ``text`` on every rank (e.g. the run folder, whose name holds a timestamp).
    Sent as bytes in a tensor: no pickling between processes."""
    if not info.enabled:
        return text
    data = torch.tensor(list(text.encode("utf-8")) if info.is_main else [], dtype=torch.uint8)
    length = torch.tensor([data.numel()], dtype=torch.long, device=device)
    dist.broadcast(length, src=0)
    buf = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if info.is_main:
        buf.copy_(data)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode("utf-8")


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a signal reached one process)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def check_ranks_in_sync(model: nn.Module, device: torch.device) -> float:
    """DDP replicas must hold identical weights: compare a checksum over ranks (at each checkpoint)
    and raise if they drifted apart. Returns the checksum. Collective: every rank calls it."""
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in model.parameters()).to(device)
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError(f"data-parallel ranks out of sync: weight checksums {lo.item()!r} .. {hi.item()!r}")
    return float(total)
