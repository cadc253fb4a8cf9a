"""Data-parallel training across processes (``torchrun`` / ``accelerate launch``).

Every rank holds its own (4-bit) base model; ranks start from identical trainable parameters
(same seed, then a broadcast from rank 0), take disjoint slices of each global batch
(:class:`agiasi.data.BatchStream`) and average gradients by one flat all-reduce of the trainable
tensors. Rank 0 writes. Off (one process) unless ``WORLD_SIZE`` > 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from agiasi.process import env_count


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = env_count("WORLD_SIZE", 1, least=1)
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    local = env_count("LOCAL_RANK", 0)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        if os.environ.get("AGIASI_CPU_AFFINITY") == "1":
            pin_cpus(local, env_count("LOCAL_WORLD_SIZE", 1, least=1))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def pin_cpus(local_rank: int, local_world: int) -> list[int]:
    """Give each rank on a host its own contiguous block of the CPUs it may use (opt-in with
    ``AGIASI_CPU_AFFINITY=1``, like accelerate's ``ACCELERATE_CPU_AFFINITY``): a launch-bound step
    runs at the speed of the core issuing its kernels, and ranks sharing cores (or hyperthread
    siblings, which Linux numbers half the list apart) can slow each other down. On 2 H200s
    (bench/RESULTS.md) three pinned runs gave 9,867-11,684 tokens/s against 10,008 unpinned, the
    ranks' spread 12-43 ms against 42 ms: inside that machine's run-to-run noise, so it is not
    the default. A process already pinned (taskset, numactl, a scheduler) is left alone.
    Returns the CPUs this rank keeps."""
    cpus = sorted(os.sched_getaffinity(0))
    if local_world < 2 or len(cpus) < 2 * local_world or len(cpus) < (os.cpu_count() or 0):
        return cpus
    per = len(cpus) // local_world
    mine = cpus[local_rank * per : (local_rank + 1) * per]
    os.sched_setaffinity(0, mine)
    return mine


def all_reduce_mean(tensors: list[torch.Tensor], d: Dist) -> None:
    """Average gradients of the trainable tensors across ranks with one flat all-reduce."""
    if not d.enabled or not tensors:
        return
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def broadcast(tensors: list[torch.Tensor], d: Dist) -> None:
    if not d.enabled:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t.data, src=0)


def all_gather(obj: Any, d: Dist) -> Any:
    """Every rank's ``obj`` as a list (one process: ``obj`` itself)."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    gathered: list[Any] = [None] * d.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sums over ranks of a few floats (in float64: the order of the ranks does not show)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()
