"""Data-parallel training of one cell over the processes of a ``torchrun`` launch (docs/architecture.md).

Under ``torchrun`` (``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in the environment) :func:`init` joins the
process group -- ``gloo`` on the CPU, ``nccl`` on CUDA, one device per local rank -- and every rank then runs
the same grid in lockstep: each trains on its shard of every epoch (:func:`shard`), gradients are all-reduced
by :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap`), rank 0 computes the pruning plan and
the others take its result (:func:`broadcast_object`), and only rank 0 (:func:`is_main`) talks to MLflow and
writes files. Without ``torchrun`` every helper is a no-op for a single process: ``world_size() == 1``,
``is_main()``, ``shard(b) is b``.
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from prunebench.datamodule import Batch, Batches
from prunebench.errors import UserError
from prunebench.serialize import apply_pruned, load_pruned, pruned_payload

T = TypeVar("T")


class RankFailed(UserError):
    """A cell failed on one rank of a ``torchrun`` job: the job stops (exit 1, one line, no traceback), since
    the other ranks may be waiting for it in a collective; ``--resume`` continues from the last checkpoint."""

    exit_code = 1


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting the same variables)."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def active() -> bool:
    """Whether the process group is up (after :func:`init` under ``torchrun``)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs to MLflow and writes checkpoints and caches."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the ``torchrun`` process group (once) and return this rank's device; ``device`` unchanged when
    not launched by ``torchrun``. CUDA ranks use ``nccl`` and ``cuda:LOCAL_RANK``; CPU ranks use ``gloo``."""
    if not launched():
        return device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    if not active():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_shutdown)
    return device


def _shutdown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (any picklable object); ``obj`` itself without a process group."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``values`` (a float64 copy on the CPU; ``values`` itself alone)."""
    if not active():
        return values
    out = values.detach().to("cpu", torch.float64) if dist.get_backend() == "gloo" else values.detach().double()
    dist.all_reduce(out)
    return out


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP synchronizes them before each
    forward, so after the last step every rank but 0 holds its own last batch's update."""
    if not active():
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def check_batch(n_batches: int) -> None:
    """Refuse an epoch with fewer batches than ranks (some rank would have nothing to train on)."""
    ws = world_size()
    if n_batches < ws:
        raise UserError(
            f"an epoch has {n_batches} training batch(es) for {ws} processes; lower data.batch_size "
            f"(it is per process: the global batch is data.batch_size x {ws}) or launch fewer processes"
        )


def shard(batches: Batches) -> Batches:
    """This rank's share of one epoch's batches: batch ``i`` of the seeded order goes to rank ``i % world``.

    Every rank gets ``ceil(n / world)`` batches (the last round is completed with the epoch's first batches,
    as ``DistributedSampler`` pads), so every rank makes the same number of optimizer steps. One optimizer
    step then sees ``world`` consecutive batches of the single-process order: the global batch is the
    per-process batch x the world size. ``batches`` itself without a process group.
    """
    ws = world_size()
    if ws == 1:
        return batches
    n = len(batches)
    check_batch(n)
    positions = shard_positions(n, rank(), ws)
    if batches.select is not None:  # the data module makes only this rank's batches
        return batches.select(positions)
    wrapped = set(positions[n // ws + (rank() < n % ws) :])  # the epoch's first batches, again

    def mine() -> Iterator[Batch]:
        kept: dict[int, Batch] = {}
        for i, b in enumerate(batches):
            if i % ws == rank():
                yield b
            if i in wrapped:
                kept[i] = b
        for i in positions[n // ws + (rank() < n % ws) :]:
            yield kept[i]

    return Batches(len(positions), mine)


def shard_positions(n: int, rank: int, world: int) -> list[int]:
    """Which of an epoch's ``n`` batches rank ``rank`` of ``world`` trains on, in order: ``rank``,
    ``rank + world``, ... and, to make every rank's count ``ceil(n / world)``, the epoch's first batches again."""
    return [(rank + world * s) % n for s in range(math.ceil(n / world))]


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in a DistributedDataParallel wrapper for a training loop (``model`` itself alone). The
    wrapper shares the module's parameters: hooks, optimizers and regularizers keep using ``model``."""
    if not active():
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


def load_checkpointed(path: Path, fresh: nn.Module) -> nn.Module:
    """:func:`prunebench.serialize.load_pruned` of ``path`` on rank 0; the other ranks take rank 0's model, so
    they need no copy of the file (machines of a ``--nnodes`` launch share no workdir). ``fresh``, in place."""
    if not active():
        return load_pruned(path, fresh)
    payload = broadcast_object(pruned_payload(load_pruned(path, fresh)) if is_main() else None)
    return fresh if is_main() else apply_pruned(payload, fresh)


def check_launch(sync_batchnorm: bool, device: torch.device) -> None:
    """Refuse a recipe that contradicts the launch: ``train.sync_batchnorm`` needs ``torchrun`` and CUDA."""
    if not sync_batchnorm:
        return
    if not launched():
        raise UserError(
            "train.sync_batchnorm is set but this is a single process; launch with "
            "'torchrun --nproc-per-node N -m prunebench run ...' or set train.sync_batchnorm: false"
        )
    if device.type != "cuda":
        raise UserError(
            "train.sync_batchnorm needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); "
            "set train.sync_batchnorm: false for CPU runs"
        )


@contextmanager
def sync_batchnorm(model: nn.Module, enabled: bool) -> Iterator[None]:
    """While the block runs, every BatchNorm of ``model`` is a :class:`~torch.nn.SyncBatchNorm` sharing its
    parameters and buffers (statistics over the global batch); the original modules are put back after, so
    the pruning graph, the methods' groups and saved models never see the swap. A no-op when not ``enabled``
    or without a process group. Forward hooks on the BatchNorm modules do not run inside the block."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if enabled and active():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                    sync = nn.SyncBatchNorm(
                        child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                    )
                    sync._parameters = child._parameters  # the very same tensors: updates land in the original
                    sync._buffers = child._buffers
                    sync.train(child.training)
                    setattr(parent, name, sync)
                    swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)
