"""Shared machinery of the group-sparsity methods (``oicsr`` and ``group_lasso``).

Both regularize per-channel groups with an L2,1 norm (``lambda * sum_i ||G_i||_2``, not squared) and
both can train in one of two modes:

* ``loss``: the penalty is added to the loss and SGD follows its (sub)gradient. The norm is computed
  as ``sqrt(||G||^2 + eps)`` so the gradient stays finite, indeed bounded by ``lambda``, at ``G = 0``.
  Groups approach zero but oscillate around it at a scale of ``lr * lambda``; pruning removes them.
* ``proximal``: no loss term; after each optimizer step every group is shrunk by the proximal operator
  of ``lr * lambda * ||.||_2`` (block soft-thresholding; for GrOWL the OWL prox of the layer's group
  norms), which gives exact zeros.

The two methods differ only in *which* weights form a group -- :attr:`GroupSparsityMethod.part`: the
whole out-in-channel (``"all"``) for OICSR, the root layer's out-channel (``"root"``) for group lasso.

Everything a hook needs is precomputed in :meth:`GroupSparsityMethod.attach` (index tensors on the
parameters' device, GrOWL weights), so a hook costs a handful of tensor ops per group,
never a per-channel Python loop, and never a host synchronisation.

Overlapping groups: the consumer ``W^{l+1}`` carries the in-channel slices of layer ``l``'s groups and
the filters of layer ``l+1``'s groups. In proximal mode the groups are shrunk one after another (the
proximal operator of a sum of overlapping group norms has no closed form); this is exact for disjoint
groups, keeps exact zeros at zero, and is the usual approximation otherwise. Momentum buffers are left
alone (proximal SGD with momentum is a heuristic too): a zeroed group stays at zero as long as the
optimizer's step on it is shorter than ``lr * lambda``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import Field
from torch import Tensor, nn

from prunebench.groups import Part, PrunableGroup
from prunebench.method import LambdaParams, PruningMethod
from prunebench.norms import GroupSlices, group_slices

# sqrt(||G||^2 + EPS): a bias of 1e-6 per group in the penalty, gradient norm <= 1 everywhere.
EPS = 1e-12


class GroupSparsityParams(LambdaParams):
    """Parameters shared by the group-sparsity methods."""

    lambda_: float = Field(
        2e-3,
        alias="lambda",
        ge=0,
        description="L2,1 factor: each step pulls every group's norm toward 0 by lr*lambda",
    )
    mode: Literal["loss", "proximal"] = Field(
        "loss", description="'loss': penalty in the loss; 'proximal': group soft-thresholding after each step"
    )


def safe_norms(sq: Tensor) -> Tensor:
    """``sqrt(sq + EPS)``: the L2 norm with a finite gradient at zero."""
    return (sq + EPS).sqrt()


def growl_weights(n: int, w_min: float, device: torch.device | None = None) -> Tensor:
    """GrOWL weights for ``n`` groups ranked by decreasing norm: linear from 1 down to ``w_min``.

    This is the OSCAR parametrization ``w_k = lambda_1 + lambda_2 (n - k)`` rescaled so that the
    largest weight is 1 (``lambda`` then sets the scale): the smallest groups feel ``w_min * lambda``
    (the sparsity part), the largest feel ``lambda`` (the extra pull on large groups ties their norms).
    """
    if n == 1:
        return torch.ones(1, device=device)
    return torch.linspace(1.0, w_min, n, device=device)


def owl_prox(v: Tensor, w: Tensor) -> Tensor:
    """Proximal operator of the OWL norm ``sum_k w_k |v|_(k)`` at ``v >= 0`` (``w`` non-increasing).

    Sort ``v`` descending, subtract ``w``, project onto the non-increasing cone, clip at 0, unsort
    (Bogdan et al. 2015; Zeng & Figueiredo 2014). The projection (isotonic regression) is computed in
    closed form, ``x_k = min_{i<=k} max_{j>=k} mean(z_i..z_j)``, with O(n^2) tensor ops instead of a
    sequential pool-adjacent-violators loop: a group has at most a few thousand channels.
    """
    n = v.numel()
    s, order = torch.sort(v, descending=True)
    z = s - w
    c = torch.cat([z.new_zeros(1), z.cumsum(0)])
    i = torch.arange(n, device=v.device)
    span = (i[None, :] - i[:, None] + 1).clamp_min(1).to(z.dtype)
    avg = (c[1:][None, :] - c[:-1][:, None]) / span  # avg[i, j] = mean(z[i..j]) for j >= i
    upper = avg.flip(1).cummax(1).values.flip(1)  # upper[i, k] = max_{j>=k} avg[i, j]
    upper = upper.masked_fill(i[:, None] > i[None, :], float("inf"))  # keep i <= k only
    x = upper.min(0).values.clamp_min(0)
    return torch.empty_like(x).scatter_(0, order, x)


GP = TypeVar("GP", bound=GroupSparsityParams)


class GroupSparsityMethod(PruningMethod[GP], Generic[GP]):
    """An L2,1 (group lasso) or GrOWL regularizer over per-channel groups of one part of each group.

    Subclasses set :attr:`part` (which members form a channel's group) and :meth:`score`; a subclass
    that supports GrOWL overrides :meth:`growl_w_min`.
    """

    Params = GroupSparsityParams
    part: ClassVar[Part] = "all"

    def __init__(self, params: GP | None = None) -> None:
        super().__init__(params)
        self.plans: list[GroupSlices] = []
        self.rank_weights: list[Tensor | None] = []

    @property
    def lam(self) -> float:
        return float(self.params.lambda_)

    @property
    def mode(self) -> str:
        return str(self.params.mode)

    def growl_w_min(self) -> float | None:
        """The smallest GrOWL weight, or ``None`` for the plain L2,1 norm (the default)."""
        return None

    def attach(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> None:
        super().attach(model, groups)
        w_min = self.growl_w_min()
        self.plans = [group_slices(g, self.part) for g in self.groups]
        self.rank_weights = [
            None if w_min is None else growl_weights(g.size, w_min, plan.slices[0].param.device)
            for g, plan in zip(self.groups, self.plans)
        ]

    def penalty(self) -> Tensor | None:
        """``lambda * sum_groups sum_k w_k ||G_(k)||`` (``w = 1`` for the L2,1 norm); loss mode only."""
        if self.mode != "loss" or self.lam == 0 or not self.plans:
            return None
        return self._penalty_term()

    def regularized_norms(self) -> list[Tensor]:
        """Per group, ``||G_i||_2`` of the regularized part (what the L2,1 norm drives to zero)."""
        return [plan.sq_norms().detach().sqrt() for plan in self.plans]

    def pull_per_lr(self, momentum: float) -> float:
        """``lambda`` per unit learning rate; ``lambda/(1-momentum)`` in ``loss`` mode (through the gradient)."""
        return self.lam / (1.0 - momentum) if self.mode == "loss" else self.lam

    @torch.no_grad()
    def regularizer_value(self) -> Tensor | None:
        """The penalty's value in either mode (proximal training has no loss term to read it from)."""
        return self._penalty_term() if self.plans else None

    def _penalty_term(self) -> Tensor:
        if all(w is None for w in self.rank_weights):
            norms = torch.cat([plan.sq_norms() for plan in self.plans])
            return self.lam * safe_norms(norms).sum()
        terms = []
        for plan, w in zip(self.plans, self.rank_weights):
            norms = safe_norms(plan.sq_norms())
            terms.append(norms.sum() if w is None else (torch.sort(norms, descending=True).values * w).sum())
        return self.lam * torch.stack(terms).sum()

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """Proximal mode: shrink every group jointly, ``G_i <- G_i * max(0, 1 - lr*lambda/||G_i||)`` (GL)."""
        if self.mode != "proximal" or self.lam == 0:
            return
        t = lr * self.lam
        for plan, w in zip(self.plans, self.rank_weights):
            norms = plan.sq_norms().sqrt()
            shrunk = (norms - t).clamp_min(0) if w is None else owl_prox(norms, t * w)
            plan.scale_(shrunk / norms.clamp_min(torch.finfo(norms.dtype).tiny))
