"""``l1`` control: filter L1 norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

Importance of a channel is the L1 norm of its filter in the root layer, ``sum |W^l[i]|``. The paper
prunes a fixed fraction per layer chosen by sensitivity analysis; as a control inside a global-greedy
harness we rank filters globally after normalizing by each layer's maximum (layers of different fan-in
have filters of very different norms, so raw norms would empty the widest-fan-in layers first).
No sparsity training: the matched budget gives it plain training of the same length.
"""

from __future__ import annotations

from torch import Tensor

from prunebench.groups import PrunableGroup
from prunebench.method import PruningMethod
from prunebench.norms import member_slice
from prunebench.registry import register_method


@register_method("l1")
class L1Norm(PruningMethod):
    description = "control: filter L1 norm of the root layer (Li et al. 2017), no sparsity training"
    normalize = "max"

    def score(self, group: PrunableGroup) -> Tensor:
        """``sum |W^l[i]|`` of the root layer's filters of each channel (a grouped conv's unit: its filters)."""
        root = group.root_member()
        return member_slice(root, root.module.weight, 0).l1_norms().detach()
