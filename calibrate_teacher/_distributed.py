"""Running under ``torchrun``: rank, world size, each rank's device, and barriers.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address) for each
process it starts. Without them we are one process and nothing here touches torch.distributed,
so the same command runs alone or scaled out. The process group only carries barriers: gloo for
CPU runs, nccl when the ranks run on CUDA devices.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from calibrate_teacher.errors import InvalidValueError

__all__ = ["DistributedContext", "distributed_context", "process_group", "rank_device"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a (possibly one-process) run.

    Attributes:
        rank: This process's rank, 0 ... world_size - 1.
        world_size: How many processes share the work.
        local_rank: The rank on this node (picks the GPU).
        backend: The torch.distributed backend in use, or None for one process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that prepares and finishes shared outputs."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank reaches this point (no-op for one process)."""
        if self.world_size == 1 or self.backend is None:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def share(self, value: int) -> int:
        """Return rank 0's ``value`` on every rank (one process: ``value``).

        Every rank must call it at the same point; the other ranks wait for rank 0's value, so
        rank 0 can tell them to go on, stop, or that it failed (rather than leave them waiting).
        """
        if self.world_size == 1 or self.backend is None:
            return value
        import torch
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        flag = torch.tensor([value if self.is_main else 0], dtype=torch.int64, device=device)
        dist.broadcast(flag, src=0)
        return int(flag.item())


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidValueError(
            f"environment variable {name}={raw!r}: expected an integer"
        ) from None


def distributed_context() -> DistributedContext:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment (defaults: one process).

    Raises:
        InvalidValueError: the variables are not integers or are inconsistent.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InvalidValueError(
            f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE; "
            "launch with torchrun or unset them"
        )
    return DistributedContext(rank=rank, world_size=world, local_rank=local)


def rank_device(device: str, context: DistributedContext) -> str:
    """Pick this rank's device: under torchrun ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``.

    An explicit ``cuda:N`` or ``cpu`` is kept as given; for one process this is ``device``.
    """
    if context.world_size == 1 or device not in ("auto", "cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{context.local_rank % torch.cuda.device_count()}"
    return "cpu" if device == "auto" else device


@contextlib.contextmanager
def process_group(device: str) -> Iterator[DistributedContext]:
    """Join the torchrun process group for the duration of the block (one process: no-op).

    Args:
        device: The device this rank's work runs on; ``cuda...`` selects nccl, anything else gloo.

    Yields:
        This process's context, with ``backend`` set when a group was joined.
    """
    context = distributed_context()
    if context.world_size == 1:
        yield context
        return
    import torch.distributed as dist

    if dist.is_initialized():  # the caller's own group (e.g. inside a training script)
        yield DistributedContext(
            context.rank, context.world_size, context.local_rank, str(dist.get_backend())
        )
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(device.partition(":")[2] or context.local_rank))
    dist.init_process_group(backend=backend)
    try:
        yield DistributedContext(context.rank, context.world_size, context.local_rank, backend)
    finally:
        dist.destroy_process_group()
