"""``random`` control: remove channels chosen uniformly at random.

Every table should show how far each method is above chance. Scores are drawn from torch's global
generator, which the harness seeds per cell, so a cell is reproducible and seeds differ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunebench.groups import PrunableGroup
from prunebench.method import PruningMethod
from prunebench.registry import register_method


@register_method("random")
class RandomChannels(PruningMethod):
    description = "control: channels removed at random (the chance baseline)"

    def score(self, group: PrunableGroup) -> Tensor:
        return torch.rand(group.size)
