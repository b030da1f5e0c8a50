"""Prunable groups: one out-channel of a layer together with everything coupled to it.

A :class:`PrunableGroup` is built from torch-pruning's ``DependencyGraph`` (see :func:`build_groups`). Its
*members* say, for every tensor the group touches, which slice belongs to which channel of the group:

* ``kind="out"`` -- the producer side: the root conv/linear's filters (weight dim 0, and bias), the
  BatchNorm that follows it (gamma, beta, running stats), and, for coupled groups (residual sums,
  depthwise convs), every other layer whose output channels are tied to the root's;
* ``kind="in"``  -- the consumer side: the matching in-channel slice (weight dim 1) of every layer that
  reads the root's output.

Channel ``c`` of the group (``0 <= c < size``) owns ``idxs[c, :]`` of every member: usually one index
(``idxs`` has shape ``[size, 1]``), several where a flatten maps one channel onto several features.

This *is* OICSR's out-in-channel group; single-layer group lasso uses only the ``"out"`` members of the
root layer. Helpers here compute per-channel norms of the whole group or a part of it, vectorized over
the channels so that regularizers cost a handful of tensor ops per group, not a Python loop per channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

Part = Literal["all", "out", "in", "root"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass(eq=False)
class GroupMember:
    """One layer's share of a group (see the module docstring)."""

    name: str
    module: nn.Module
    kind: Literal["out", "in"]
    idxs: Tensor  # LongTensor [size, m]

    def params(self) -> list[tuple[Tensor, int]]:
        """The learnable tensors this member touches and the dimension that indexes channels."""
        m = self.module
        if self.kind == "in":
            return [(m.weight, 1)] if getattr(m, "weight", None) is not None else []
        out: list[tuple[Tensor, int]] = []
        if getattr(m, "weight", None) is not None:
            out.append((m.weight, 0))
        if getattr(m, "bias", None) is not None:
            out.append((m.bias, 0))
        return out

    @property
    def is_norm(self) -> bool:
        return isinstance(self.module, _NORM_TYPES)

    def sq_norms(self) -> Tensor:
        """Per-channel sum of squares of this member's weights, shape ``[size]`` (differentiable)."""
        total: Tensor | None = None
        flat = self.idxs.reshape(-1)
        for p, dim in self.params():
            sel = p.index_select(dim, flat.to(p.device))
            sel = sel.movedim(dim, 0).reshape(self.idxs.shape[0], -1)
            s = sel.pow(2).sum(1)
            total = s if total is None else total + s
        if total is None:
            return torch.zeros(self.idxs.shape[0])
        return total


@dataclass(eq=False)
class PrunableGroup:
    """A set of channels that can only be removed together (see the module docstring).

    ``coupled`` is true when the channels are tied to a residual sum or a concatenation, i.e. when the
    group is outside the ``internal`` scope. ``tp_root`` and ``tp_fn`` let the engine ask the dependency
    graph for the group again when it cuts.
    """

    name: str
    root: nn.Module
    size: int
    members: list[GroupMember]
    coupled: bool = False
    tp_fn: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(iter(self.root.parameters())).device

    def part(self, part: Part) -> list[GroupMember]:
        """Members of one side: ``out``, ``in``, ``root`` (the root layer and the norm right after it), or ``all``."""
        if part == "all":
            return list(self.members)
        if part == "root":
            outs = [m for m in self.members if m.kind == "out"]
            root = [m for m in outs if m.module is self.root]
            norm = next((m for m in outs if m.is_norm), None)
            return root + ([norm] if norm is not None else [])
        return [m for m in self.members if m.kind == part]

    def sq_norms(self, part: Part = "all") -> Tensor:
        """Per-channel squared L2 norm of the group's weights restricted to ``part``, shape ``[size]``."""
        total = torch.zeros(self.size, device=self.device)
        for m in self.part(part):
            total = total + m.sq_norms().to(total.device)
        return total

    def consumers(self) -> list[GroupMember]:
        """The ``in`` members that are convolutions or linear layers (what reads this group's output)."""
        return [m for m in self.members if m.kind == "in" and isinstance(m.module, (nn.Conv2d, nn.Linear))]

    def norm_layer(self) -> nn.Module | None:
        """The normalization layer on the producer side (for BN-gamma methods such as slimming)."""
        return next((m.module for m in self.part("out") if m.is_norm), None)
