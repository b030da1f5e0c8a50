"""Sparsity diagnostics: can a method's regularizer act, and did it? (docs/fairness.md: "A regularizer
must be able to act").

Three figures for every regularized cell (a method whose :meth:`~prunebench.method.PruningMethod.
regularized_norms` is not empty):

* ``sparsity_pull`` -- the largest total shrinkage the regularizer can apply over the sparsity stage
  (``sum(lr * lambda)`` over its steps, times ``1/(1-momentum)`` when the pull goes through the gradient),
  divided by the median regularized norm at the start of the stage. Below about 0.5 the method is only its
  importance score on a plainly trained network;
* ``sparsity_zero_frac`` -- the fraction of regularized channels whose norm is below
  :data:`ZERO_THRESHOLD` of its layer's median at the start of the stage;
* ``penalty_ratio`` -- the regularizer's value divided by the task loss over the stage's last epoch.

Nothing here imports MLflow: :class:`SparsityMonitor` returns figures, the pipeline logs them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from prunebench.method import PruningMethod
from prunebench.recipe import Schedule
from prunebench.train import EpochStats, lr_at

ZERO_THRESHOLD = 0.05
"""A channel counts as zeroed below this fraction of its layer's median norm at the start of the stage."""

MIN_PULL = 0.5
"""``prunebench run`` warns (or, with ``sparsity.require_pull``, refuses) below this ``sparsity_pull``."""


def lr_sum(sched: Schedule, steps_per_epoch: int) -> float:
    """``sum(lr)`` over every step of a stage, with the loop's own per-step learning rate."""
    n = max(int(steps_per_epoch), 1)
    return sum(lr_at(sched, epoch + i / n) for epoch in range(sched.epochs) for i in range(n))


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps per epoch (the last partial batch included, as the data module yields it)."""
    return math.ceil(n_train / batch_size)


def _layer_norms(method: PruningMethod) -> list[Tensor]:
    return [n.detach().double().cpu().reshape(-1) for n in method.regularized_norms() if n.numel()]


def _median(x: Tensor) -> float:
    """The usual median (the mean of the two middle values for an even count; torch.median takes the lower)."""
    return float(torch.quantile(x, 0.5))


def median_norm(method: PruningMethod) -> float | None:
    """The median regularized norm over every channel, or ``None`` for a method without a regularizer."""
    norms = _layer_norms(method)
    return _median(torch.cat(norms)) if norms else None


def sparsity_pull(method: PruningMethod, sched: Schedule, steps: int) -> float | None:
    """``sparsity_pull`` of ``method`` (attached to its model) over a stage of ``sched``; ``None`` when the
    method has no regularizer."""
    med = median_norm(method)
    if med is None:
        return None
    return method.pull_per_lr(sched.momentum) * lr_sum(sched, steps) / max(med, 1e-12)


def lambda_for_pull(unit: PruningMethod, sched: Schedule, steps: int, pull: float) -> float | None:
    """The ``lambda`` at which a stage of ``sched`` reaches ``pull``. ``unit`` is the method built with
    ``lambda = 1`` and attached (its pull is linear in ``lambda``)."""
    per_unit = sparsity_pull(unit, sched, steps)
    return None if not per_unit else pull / per_unit


@dataclass
class SparsityMonitor:
    """Watches one regularized cell's sparsity stage: built at its start, asked at every epoch end."""

    method: PruningMethod
    pull: float
    medians: list[float]
    start: list[Tensor]  # per layer: norm / layer median at the start
    last: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start_of_stage(cls, method: PruningMethod, sched: Schedule, steps: int) -> SparsityMonitor | None:
        """``None`` for a method without a regularizer (nothing to watch)."""
        norms = _layer_norms(method)
        if not norms:
            return None
        medians = [max(_median(n), 1e-12) for n in norms]
        pull = method.pull_per_lr(sched.momentum) * lr_sum(sched, steps) / max(_median(torch.cat(norms)), 1e-12)
        return cls(method, pull, medians, [n / m for n, m in zip(norms, medians)])

    def relative_norms(self) -> list[Tensor]:
        """Per layer, the current norms divided by the layer's median at the start."""
        return [n / m for n, m in zip(_layer_norms(self.method), self.medians)]

    def zero_frac(self) -> float:
        rel = torch.cat(self.relative_norms())
        return float((rel < ZERO_THRESHOLD).float().mean())

    def epoch_end(self, stats: EpochStats) -> dict[str, float]:
        """The epoch's diagnostics: zero fraction and penalty ratio (with the pull, constant over the stage).

        In ``loss`` mode the penalty is the epoch's mean (``train_penalty``); otherwise (proximal steps,
        slimming's subgradient) the regularizer's value at the epoch end.
        """
        value = stats.train_penalty
        if not value:
            reg = self.method.regularizer_value()
            value = float(reg.detach()) if reg is not None else 0.0
        ratio = value / stats.train_loss if stats.train_loss > 0 else math.nan
        self.last = {"sparsity_zero_frac": self.zero_frac(), "penalty_ratio": ratio, "sparsity_pull": self.pull}
        return dict(self.last)

    def norms_record(self) -> dict[str, list[float]]:
        """``{"start": [...], "end": [...]}``: every channel's norm over its layer's starting median."""
        return {
            "start": [round(float(v), 6) for v in torch.cat(self.start)],
            "end": [round(float(v), 6) for v in torch.cat(self.relative_norms())],
        }


def describe_inert(name: str, pull: float, *, refused: bool = False) -> str:
    """The message for a regularizer that cannot act, naming the figure and the fixes."""
    how = (
        "sparsity.require_pull is true: set it to false to run anyway with a warning"
        if refused
        else "set sparsity.require_pull: true to make this an error"
    )
    return (
        f"method {name!r}: sparsity_pull {pull:.3g} < {MIN_PULL}: over this sparsity stage its regularizer can "
        f"shrink the median group norm by at most {100 * pull:.2g}%, so it ranks channels of a plainly trained "
        f"network; raise its lambda, lengthen sparsity.epochs or raise sparsity.lr, or run `prunebench tune` "
        f"({how})"
    )


def check_pulls(pulls: Sequence[tuple[str, float | None]], *, refused: bool = False) -> list[str]:
    """The messages for every (label, pull) below :data:`MIN_PULL`."""
    return [describe_inert(label, p, refused=refused) for label, p in pulls if p is not None and p < MIN_PULL]
