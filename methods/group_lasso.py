"""``group_lasso``: single-layer group lasso over out-channels (Wen et al., "Learning Structured
Sparsity in Deep Neural Networks", NeurIPS 2016 -- the filter-wise / channel-wise SSL).

The group of channel ``i`` is the root layer's out-channel only: ``[W^l[i], (b^l_i), gamma_i, beta_i]``
(``part("root")``: the root conv and the norm right after it). Penalty ``lambda * sum_i ||.||_2`` (L2,1,
not squared), in the loss or as a proximal step -- the same machinery as ``oicsr``
(:mod:`methods._group_sparsity`), so the only difference between the two is the group definition.
This is the "separated structured sparsity" baseline OICSR argues against: the consumer's in-channel
``W^{l+1}[:, i]`` is neither regularized nor looked at.

Choices the paper leaves open, and ours:

* BatchNorm: SSL predates the habit of pruning through BN; we include the channel's gamma and beta in
  its group so that a zeroed group is a dead channel (a zero filter with a non-zero beta is not).
* Importance: the norm of the same regularized group ``||[W^l[i], b^l_i, gamma_i, beta_i]||_2``
  (``score: group``, the default), so that ``group_lasso`` and ``oicsr`` differ only in the consumer's
  in-channel. Behind a BatchNorm a filter's scale carries no importance (BN renormalizes it), so the
  filter norm alone would mix a second change into "OICSR vs group lasso"; it is kept as the ablation
  ``score: filter`` (``||W^l[i]||_2``).
* Cross-layer ranking: normalized by the layer's maximum (``normalize = "max"``), like ``oicsr``, so the
  two methods rank with the same rule; raw norms are not comparable across layers of different fan-in.
* ``lambda`` default and ``mode`` as for ``oicsr`` (see its docstring for the arithmetic): the root
  groups have smaller norms than the out-in groups, so the same ``lambda`` pulls them at least as hard.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor

from prunebench.groups import Part, PrunableGroup
from prunebench.methods._group_sparsity import GroupSparsityMethod, GroupSparsityParams
from prunebench.norms import group_slices, member_slice
from prunebench.registry import register_method


class GroupLassoParams(GroupSparsityParams):
    """Group lasso's parameters: ``lambda``, ``mode`` and which norm ranks the channels."""

    score: Literal["group", "filter"] = Field(
        "group",
        description="'group': norm of the regularized group (filter, bias, gamma, beta); 'filter': "
        "the root filter's norm only (ablation)",
    )


@register_method("group_lasso")
class GroupLasso(GroupSparsityMethod[GroupLassoParams]):
    description = (
        "group lasso on the root layer's out-channels (Wen et al. 2016, SSL), regularized-group norm importance"
    )
    normalize = "max"
    part: ClassVar[Part] = "root"

    def score(self, group: PrunableGroup) -> Tensor:
        """``||[W^l[i], b^l_i, gamma_i, beta_i]||_2`` (``score: group``) or ``||W^l[i]||_2`` (``score: filter``)."""
        if self.params.score == "group":
            return group_slices(group, "root").sq_norms().detach().sqrt()
        root = next((m for m in group.part("out") if m.module is group.root), None)
        if root is None:
            raise ValueError(f"group {group.name!r} has no member for its root layer")
        return member_slice(root, root.module.weight, 0).sq_norms().detach().sqrt()
