"""``slimming``: Network Slimming (Liu et al., "Learning Efficient Convolutional Networks through
Network Slimming", ICCV 2017).

An L1 penalty on the BatchNorm scaling factors, ``lambda * sum |gamma|``, applied as its subgradient:
after ``backward()`` we add ``lambda * sign(gamma)`` to ``gamma.grad`` (as the paper's code does). The
importance of a channel is ``|gamma_i|`` and channels are removed by one global threshold over the
whole network -- no per-layer normalization (``normalize = None``): the penalty puts every gamma on
one scale, which is the point of the method.

Choices the paper leaves open, and ours:

* ``lambda`` default 1e-5, the paper's value for ResNet and DenseNet on CIFAR (it used 1e-4 for VGG;
  set ``lambda: 1e-4`` in the recipe for VGG-like plain networks).
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

from pydantic import Field
from torch import Tensor, nn

from prunebench.groups import PrunableGroup
from prunebench.method import LambdaParams, PruningMethod
from prunebench.methods._group_sparsity import member_slice
from prunebench.registry import register_method


class SlimmingParams(LambdaParams):
    """Network Slimming's L1 factor on BN gammas."""

    lambda_: float = Field(
        1e-5, alias="lambda", ge=0, description="L1 factor on BN gamma (paper: 1e-5 ResNet/DenseNet, 1e-4 VGG)"
    )


@register_method("slimming")
class NetworkSlimming(PruningMethod):
    description = "Network Slimming (Liu et al. 2017): L1 on BN gamma, |gamma| importance, one global threshold"
    Params = SlimmingParams
    normalize = None

    def attach(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> None:
        super().attach(model, groups)
        norms = {id(n): n for g in self.groups if (n := g.norm_layer()) is not None}
        self.gammas: list[Tensor] = [n.weight for n in norms.values() if getattr(n, "weight", None) is not None]

    def after_backward(self) -> None:
        """``gamma.grad += lambda * sign(gamma)`` for the norm layer of every prunable group."""
        lam = float(self.params.lambda_)  # type: ignore[attr-defined]
        if lam == 0:
            return
        for gamma in self.gammas:
            step = gamma.detach().sign().mul_(lam)
            if gamma.grad is None:
                gamma.grad = step
            else:
                gamma.grad.add_(step)

    def score(self, group: PrunableGroup) -> Tensor:
        """``|gamma_i|`` of the group's norm layer; the root filter's L1 norm if there is none."""
        norm = next((m for m in group.part("out") if m.is_norm and getattr(m.module, "weight", None) is not None), None)
        if norm is not None:
            return member_slice(norm, norm.module.weight, 0).l1_norms().detach()
        root = next(m for m in group.part("out") if m.module is group.root)
        return member_slice(root, root.module.weight, 0).l1_norms().detach()
