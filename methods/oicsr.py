"""``oicsr``: Out-In-Channel Sparsity Regularization (Li et al., "OICSR: Out-In-Channel Sparsity
Regularization for Compact Deep Neural Networks", CVPR 2019, arXiv:1905.11664).

Removing out-channel ``i`` of layer ``l`` also removes in-channel ``i`` of every consumer, so OICSR
regularizes the two together: the group is ``G_i = [W^l[i], gamma_i, beta_i, W^{l+1}[:, i]]`` -- every
member of the prunable group, out side and in side (all consumers). Training with the group penalty
moves the network's features into a fraction of the out-in-channels; the importance of a channel is
then its group energy ``||G_i||^2``, statistics of two consecutive layers rather than one.

* ``variant: gl`` (OICSR-GL) -- ``lambda * sum_l sum_i ||G_i||_2`` (the L2,1 norm, not squared).
* ``variant: growl`` (OICSR-GrOWL) -- ``lambda * sum_l sum_k w_k ||G_(k)||_2`` with the group norms of
  a layer sorted descending and weights decreasing linearly with the rank from 1 to ``growl_min``
  (OSCAR-style; see :func:`methods._group_sparsity.growl_weights`).

Choices the paper leaves open, and ours:

* BatchNorm: the paper's group concatenates the two weight slices; we add the channel's BN gamma and beta
  (docs/methods.md), because a zero filter with a non-zero beta still feeds the next layer.
* GrOWL weights: we use the OSCAR linear decay, the common GrOWL choice (Oswal et al. 2016; Zhang et
  al. 2018), parametrized by ``growl_min`` (smallest / largest weight, default 0.5), and rank the group
  norms within one layer's prunable group, so that ``lambda`` keeps one meaning across layers of
  different widths (ranking all groups of the network together is the alternative). ``growl_min`` is
  ignored by the ``gl`` variant; ``growl_min = 1`` gives back ``gl`` exactly.
* Optimization: the paper trains with the penalty in the loss (``mode: loss``, the default). ``mode:
  proximal`` applies the exact proximal operator after each SGD step instead (block soft-thresholding;
  for GrOWL the OWL prox on the layer's group norms), which produces exact zeros.
* ``lambda`` default 2e-3, calibrated so that the reference sparsity stage -- the paper-scale CIFAR-10
  recipe's 40 epochs at lr 0.01, 352 steps each, SGD momentum 0.9 -- can act: the L2,1 (sub)gradient of
  norm ``lambda`` per group, amplified by momentum to ``lambda/(1-0.9)`` per unit of learning rate, shrinks
  a group by at most ``sum(lr) * lambda / (1-mu) = 140.8 * 2e-3 * 10 = 2.8`` over the stage: a
  ``sparsity_pull`` of 1.4 for a median out-in group norm of about 2 (docs/fairness.md). At the former
  1e-4 the pull was 0.07 and weight decay pulled harder than the penalty. A shorter stage needs a larger
  ``lambda`` (``prunebench run`` warns below pull 0.5); ``prunebench tune`` searches the range where the
  recipe's own stage reaches pull 0.5 to 16.
* Cross-layer ranking: the paper ranks the out-in-channels of all layers globally by this statistic;
  how scores of different layers are made comparable is our choice: we normalize by the layer's
  maximum (``normalize = "max"``). With max normalization the ranking of the energy ``||G||^2`` equals
  that of the norm ``||G||`` (a monotone map applied to every layer alike), so OICSR and
  ``group_lasso`` differ only in which weights form the group, and a wide layer's scores are not shrunk
  by its width as a sum normalization would do.
* Iterative greedy pruning (the paper alternates pruning and retraining) and the per-layer cap are the
  shared engine's (``iterations: k``, ``max_layer_ratio``), identical for every method.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor

from prunebench.groups import Part, PrunableGroup
from prunebench.methods._group_sparsity import GroupSparsityMethod, GroupSparsityParams
from prunebench.norms import group_slices
from prunebench.registry import register_method


class OICSRParams(GroupSparsityParams):
    """OICSR's parameters: ``lambda``, ``mode``, ``variant`` and the GrOWL slope."""

    variant: Literal["gl", "growl"] = Field("gl", description="'gl': L2,1 norm; 'growl': group ordered weighted L1")
    growl_min: float = Field(
        0.5, ge=0, le=1, description="GrOWL: weight of the smallest group relative to the largest (linear decay)"
    )


@register_method("oicsr")
class OICSR(GroupSparsityMethod[OICSRParams]):
    description = "OICSR (Li et al. 2019): group sparsity over out-channel + consumers' in-channel, group energy"
    normalize = "max"
    part: ClassVar[Part] = "all"

    def growl_w_min(self) -> float | None:
        return self.params.growl_min if self.params.variant == "growl" else None

    def score(self, group: PrunableGroup) -> Tensor:
        """Out-in-channel energy ``||G_i||^2`` over every member of the group."""
        return group_slices(group, "all").sq_norms().detach()
