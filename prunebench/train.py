"""The training loop: one function that reads top to bottom, shared by every stage and every method.

Dense training, sparsity training and fine-tuning all run through :func:`train`; the only thing that
differs between methods is the hooks of the :class:`~prunebench.method.PruningMethod` passed in (or none:
plain training, which is what methods without sparsity training get under the matched budget).

Speed notes (see ``prunebench bench``): the loop never calls ``.item()`` per step. Loss, penalty and
accuracy accumulate on the device and are read every ``log_every`` steps -- which is also where a
NaN/inf loss is detected, so divergence costs at most ``log_every`` wasted steps and no host sync per step.
The model runs channels_last on every device (oneDNN's and cuDNN's NHWC convolutions are the fast path:
14-65% faster training steps on CPU for the CIFAR ResNets, reports/perf/), under bf16 autocast on CUDA and in
float32 on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prunebench import distributed
from prunebench.errors import DivergedError
from prunebench.method import PruningMethod
from prunebench.recipe import Schedule, TrainOptions


@dataclass
class EpochStats:
    """What one epoch produced (logged per epoch, ``step`` = global epoch)."""

    epoch: int
    train_loss: float
    train_penalty: float
    train_top1: float
    lr: float
    images_per_s: float
    val_top1: float | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)  # e.g. the sparsity stage's (prunebench.sparsity)
    norms: dict[str, list[float]] | None = None  # the sparsity stage's last epoch: its sorted-norms record


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU runs are then bit-for-bit repeatable)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(sched: Schedule, epoch: float) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then cosine, step or constant."""
    if sched.warmup_epochs and epoch < sched.warmup_epochs:
        return sched.lr * (epoch + 1e-3) / sched.warmup_epochs
    if sched.schedule == "cosine":
        span = max(sched.epochs - sched.warmup_epochs, 1)
        return 0.5 * sched.lr * (1 + math.cos(math.pi * min((epoch - sched.warmup_epochs) / span, 1.0)))
    if sched.schedule == "step":
        return sched.lr * sched.gamma ** sum(epoch >= m for m in sched.milestones)
    return sched.lr


def make_optimizer(model: nn.Module, sched: Schedule) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(),
        lr=sched.lr,
        momentum=sched.momentum,
        nesterov=sched.nesterov and sched.momentum > 0,
        weight_decay=sched.weight_decay,
    )


def _autocast(device: torch.device, opts: TrainOptions) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and opts.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device, opts: TrainOptions) -> nn.Module:
    """Move to the device, channels_last unless ``opts.channels_last`` is off. Returns the same module object."""
    model.to(device)
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def to_memory_format(x: Tensor, opts: TrainOptions) -> Tensor:
    """An image batch in the memory format the model was prepared in (:func:`prepare_model`)."""
    if opts.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], opts: TrainOptions | None = None) -> float:
    """Top-1 accuracy (a fraction) over ``batches``; NaN when there are none."""
    opts = opts or TrainOptions()
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    total = 0
    for x, y in batches:
        device = x.device
        x = to_memory_format(x, opts)
        with _autocast(device, opts):
            out = model(x)
        correct = correct.to(device) + (out.argmax(1) == y).sum()
        total += y.numel()
    model.train(was_training)
    return float(correct) / total if total else float("nan")


def train(
    model: nn.Module,
    batches_for_epoch: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    sched: Schedule,
    *,
    method: PruningMethod | None = None,
    opts: TrainOptions | None = None,
    desc: str = "train",
    quiet: bool = False,
    start_epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    on_epoch_end: Callable[[EpochStats, torch.optim.Optimizer], None] | None = None,
) -> list[EpochStats]:
    """Train ``model`` for ``sched.epochs`` epochs (from ``start_epoch``, for resuming).

    ``batches_for_epoch(epoch)`` returns that epoch's (already augmented, on-device) batches, so the data
    order is a pure function of the seed and the epoch. ``method`` hooks run at the fixed points described
    in :mod:`prunebench.method`. ``val_fn`` (validation top-1) runs at every epoch end; ``on_epoch_end``
    receives the stats and the optimizer (checkpointing and logging hang off it).

    Under ``torchrun`` (:mod:`prunebench.distributed`) each rank trains on its shard of every epoch through a
    DDP wrapper of ``model`` made for this call (so a pruned model gets a fresh one), the epoch's figures are
    summed over the ranks, and every epoch ends with rank 0's buffers on every rank.
    """
    opts = opts or TrainOptions()
    optimizer = optimizer or make_optimizer(model, sched)
    history: list[EpochStats] = []
    with distributed.sync_batchnorm(model, opts.sync_batchnorm):
        # under torchrun: DDP for the loop only; hooks, optimizer and regularizers keep the module itself
        step_model: Callable[..., Tensor] = distributed.wrap(model)
        if opts.compile:
            step_model = torch.compile(step_model)  # type: ignore[assignment]
        _epochs(
            model,
            step_model,
            batches_for_epoch,
            sched,
            method,
            opts,
            desc,
            quiet,
            start_epoch,
            optimizer,
            history,
            val_fn,
            on_epoch_end,
        )
    return history


def _epochs(
    model: nn.Module,
    step_model: Callable[..., Tensor],
    batches_for_epoch: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    sched: Schedule,
    method: PruningMethod | None,
    opts: TrainOptions,
    desc: str,
    quiet: bool,
    start_epoch: int,
    optimizer: torch.optim.Optimizer,
    history: list[EpochStats],
    val_fn: Callable[[nn.Module], float] | None,
    on_epoch_end: Callable[[EpochStats, torch.optim.Optimizer], None] | None,
) -> None:
    """The epochs of :func:`train` (``step_model``: ``model``, or its DDP wrapper / compiled form)."""
    loss_fn = nn.CrossEntropyLoss(label_smoothing=sched.label_smoothing)
    for epoch in range(start_epoch, sched.epochs):
        model.train()
        batches = distributed.shard(batches_for_epoch(epoch))  # this rank's share (all of it alone)
        n_steps = len(batches)  # type: ignore[arg-type]
        bar = tqdm(
            batches,
            total=n_steps,
            desc=f"{desc} {epoch + 1}/{sched.epochs}",
            leave=False,
            disable=quiet,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        loss_sum = penalty_sum = correct = None
        seen = 0
        sums = (0.0, 0.0, 0.0, 0.0)  # loss, penalty, correct, images: over every rank, at the last read
        t0 = time.perf_counter()
        lr = sched.lr
        for i, (x, y) in enumerate(bar):
            lr = lr_at(sched, epoch + i / max(n_steps, 1))
            for g in optimizer.param_groups:
                g["lr"] = lr
            x = to_memory_format(x, opts)
            with _autocast(x.device, opts):
                out = step_model(x)
                loss = loss_fn(out.float(), y)
            penalty = method.penalty() if method is not None else None
            total = loss if penalty is None else loss + penalty
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if method is not None:
                method.after_backward()
            optimizer.step()
            if method is not None:
                method.after_step(lr)
            # Accumulate on the device; read back only every log_every steps (no per-step host sync).
            batch_loss = loss.detach() * y.numel()
            batch_pen = (
                penalty.detach().float() * y.numel() if penalty is not None else torch.zeros((), device=x.device)
            )
            batch_correct = (out.detach().argmax(1) == y).sum()
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
            penalty_sum = batch_pen if penalty_sum is None else penalty_sum + batch_pen
            correct = batch_correct if correct is None else correct + batch_correct
            seen += y.numel()
            if (i + 1) % opts.log_every == 0 or i + 1 == n_steps:
                sums = _global_sums(loss_sum, penalty_sum, correct, seen)  # the one host sync every log_every steps
                mean_loss = sums[0] / sums[3]
                if not math.isfinite(mean_loss) or not math.isfinite(sums[1]):
                    raise DivergedError(f"{desc}: loss became {mean_loss} at epoch {epoch + 1}, step {i + 1}")
                if not quiet:
                    bar.set_postfix(
                        loss=f"{mean_loss:.3f}",
                        acc=f"{sums[2] / sums[3]:.3f}",
                        img_s=f"{sums[3] / (time.perf_counter() - t0):.0f}",
                        refresh=False,
                    )
        bar.close()
        if seen == 0:
            raise RuntimeError(f"{desc}: the training split is empty")
        elapsed = time.perf_counter() - t0
        stats = EpochStats(
            epoch=epoch,
            train_loss=sums[0] / sums[3],
            train_penalty=sums[1] / sums[3],
            train_top1=sums[2] / sums[3],
            lr=lr,
            images_per_s=sums[3] / elapsed,
        )
        distributed.broadcast_buffers(model)  # every rank evaluates, prunes and saves rank 0's statistics
        if method is not None:
            method.on_epoch_end(epoch)
        if val_fn is not None:
            stats.val_top1 = val_fn(model)
        history.append(stats)
        if on_epoch_end is not None:
            on_epoch_end(stats, optimizer)


def _global_sums(
    loss_sum: Tensor, penalty_sum: Tensor, correct: Tensor, seen: int
) -> tuple[float, float, float, float]:
    """(loss, penalty, correct, images) summed so far: this process's, or every rank's under ``torchrun`` (so
    every rank sees the same figures and stops together on a divergence)."""
    if not distributed.active():
        return float(loss_sum), float(penalty_sum), float(correct), float(seen)
    local = torch.stack(
        [
            loss_sum.double(),
            penalty_sum.double(),
            correct.double(),
            torch.tensor(seen, dtype=torch.float64, device=loss_sum.device),
        ]
    )
    total = distributed.all_reduce_sum(local).tolist()
    return total[0], total[1], total[2], total[3]
