"""``slimming``: Network Slimming (Liu et al., "Learning Efficient Convolutional Networks through
Network Slimming", ICCV 2017).

An L1 penalty on the BatchNorm scaling factors, ``lambda * sum |gamma|``, applied as its subgradient:
after ``backward()`` we add ``lambda * sign(gamma)`` to ``gamma.grad`` (as the paper's code does). The
importance of a channel is ``|gamma_i|`` and channels are removed by one global threshold over the
whole network -- no per-layer normalization (``normalize = None``): the penalty puts every gamma on
one scale, which is the point of the method.

Choices the paper leaves open, and ours:

* ``lambda`` default 1e-3. The paper's 1e-5 (ResNet/DenseNet; 1e-4 for VGG) goes with 160 epochs from
  scratch at lr 0.1; from a trained network over the reference sparsity stage (the paper-scale CIFAR-10
  recipe: 40 epochs at lr 0.01, 352 steps each, momentum 0.9) it would shrink a gamma by at most
  ``sum(lr) * lambda / (1-mu) = 140.8 * 1e-5 * 10 = 0.014``: nothing. 1e-3 gives 1.4, a
  ``sparsity_pull`` of about 1.6 for a median ``|gamma|`` of 0.9 (docs/fairness.md). Tune it for other
  schedules (``prunebench tune``); ``prunebench run`` warns below pull 0.5.
* Which BNs: only the norm layer of every prunable group (``group.norm_layer()``). BNs outside the
  prunable groups (e.g. on residual streams under ``scope: internal``) are never pruned, so pushing their
  gammas to zero would only cost accuracy; they are not regularized.
* A group without a norm layer (a conv not followed by BN) falls back to the L1 norm of its root filters.
  That score is on another scale than ``|gamma|``: such groups are rare in BN networks, and a network
  made mostly of them should use ``l1`` instead.
* Under mixed precision with a gradient scaler the subgradient must be added after unscaling; the
  shared loop uses bf16 autocast without a scaler, so the gradients seen here are true gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from prunebench.groups import PrunableGroup
from prunebench.method import LambdaParams, PruningMethod
from prunebench.norms import member_slice
from prunebench.registry import register_method


class SlimmingParams(LambdaParams):
    """Network Slimming's L1 factor on BN gammas."""

    lambda_: float = Field(
        1e-3,
        alias="lambda",
        ge=0,
        description="L1 factor on BN gamma (calibrated for a 40-epoch stage at lr 0.01; "
        "the paper's 1e-5 goes with 160 epochs from scratch at lr 0.1)",
    )


@register_method("slimming")
class NetworkSlimming(PruningMethod[SlimmingParams]):
    description = "Network Slimming (Liu et al. 2017): L1 on BN gamma, |gamma| importance, one global threshold"
    normalize = None

    def attach(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> None:
        super().attach(model, groups)
        norms = {id(n): n for g in self.groups if (n := g.norm_layer()) is not None}
        self.gammas: list[Tensor] = [n.weight for n in norms.values() if getattr(n, "weight", None) is not None]

    def after_backward(self) -> None:
        """``gamma.grad += lambda * sign(gamma)`` for the norm layer of every prunable group."""
        lam = float(self.params.lambda_)
        if lam == 0:
            return
        for gamma in self.gammas:
            step = gamma.detach().sign().mul_(lam)
            if gamma.grad is None:
                gamma.grad = step
            else:
                gamma.grad.add_(step)

    def regularized_norms(self) -> list[Tensor]:
        """``|gamma|`` of every regularized norm layer."""
        return [g.detach().abs() for g in self.gammas]

    def pull_per_lr(self, momentum: float) -> float:
        """``lambda / (1 - momentum)``: the subgradient goes through SGD's momentum."""
        return float(self.params.lambda_) / (1.0 - momentum)

    @torch.no_grad()
    def regularizer_value(self) -> Tensor | None:
        """``lambda * sum |gamma|`` (a subgradient, never a loss term)."""
        if not self.gammas:
            return None
        return float(self.params.lambda_) * torch.stack([g.abs().sum() for g in self.gammas]).sum()

    def score(self, group: PrunableGroup) -> Tensor:
        """``|gamma_i|`` of the group's norm layer (the mean over a grouped conv's unit of channels, so that
        one global threshold compares like with like); the root filter's L1 norm if there is none."""
        norm = next(
            (m for m in group.part("root") if m.is_norm and getattr(m.module, "weight", None) is not None), None
        )
        if norm is None:
            norm = next(
                (m for m in group.part("out") if m.is_norm and getattr(m.module, "weight", None) is not None), None
            )
        if norm is not None:
            return member_slice(norm, norm.module.weight, 0).l1_norms().detach() / norm.idxs.shape[1]
        root = group.root_member()
        return member_slice(root, root.module.weight, 0).l1_norms().detach()
