"""Per-channel norms of a group's weights: the one API the built-in methods and third-party plugins share.

A :class:`ChannelSlice` is one tensor's share of a group (the entries along ``dim`` that the group's
channels own); :func:`group_slices` gathers the slices of one part of a group (``all``: OICSR's out-in
group, ``root``: the producing layer and its norm, ``out``, ``in``) into a :class:`GroupSlices`. Both give
per-channel sums of squares (differentiable) and scale channels in place, vectorized over the channels:
a regularizer costs a handful of tensor ops per group, never a Python loop per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prunebench.groups import GroupMember, Part, PrunableGroup

__all__ = ["ChannelSlice", "GroupSlices", "group_slices", "member_slice"]


@dataclass(frozen=True, eq=False)
class ChannelSlice:
    """One tensor's share of a group: ``param``'s entries along ``dim`` at ``index``, ``m`` per channel.

    ``index`` is the flattened ``idxs`` of a :class:`~prunebench.groups.GroupMember` (channel ``c`` owns
    ``index[c*m:(c+1)*m]``), already on the parameter's device.
    """

    param: Tensor
    dim: int
    index: Tensor
    m: int

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        return tuple(d for d in range(self.param.dim()) if d != self.dim)

    def sq_norms(self) -> Tensor:
        """Per-channel sum of squares, shape ``[size]`` (differentiable).

        Reduces the whole tensor to one value per index along ``dim`` first, then gathers: no copy of
        the selected slices is made.
        """
        p = self.param
        per_index = p.square().sum(self.reduce_dims) if p.dim() > 1 else p.square()
        return per_index.index_select(0, self.index).view(-1, self.m).sum(1)

    def l1_norms(self) -> Tensor:
        """Per-channel sum of absolute values, shape ``[size]`` (differentiable)."""
        p = self.param
        per_index = p.abs().sum(self.reduce_dims) if p.dim() > 1 else p.abs()
        return per_index.index_select(0, self.index).view(-1, self.m).sum(1)

    @torch.no_grad()
    def scale_(self, factor: Tensor) -> None:
        """Multiply channel ``c``'s entries by ``factor[c]`` in place (one multiply of the tensor)."""
        p = self.param
        mult = torch.ones(p.shape[self.dim], device=p.device, dtype=p.dtype)
        mult.index_copy_(0, self.index, factor.to(p.dtype)[:, None].expand(-1, self.m).reshape(-1))
        shape = [1] * p.dim()
        shape[self.dim] = -1
        p.mul_(mult.view(shape))


@dataclass(eq=False)
class GroupSlices:
    """A :class:`PrunableGroup` restricted to one part, as precomputed slices (see :func:`group_slices`)."""

    group: PrunableGroup
    slices: list[ChannelSlice]

    def sq_norms(self) -> Tensor:
        """Per-channel squared L2 norm of the planned part of the group, shape ``[size]``."""
        total = self.slices[0].sq_norms()
        for s in self.slices[1:]:
            total = total + s.sq_norms()
        return total

    @torch.no_grad()
    def scale_(self, factor: Tensor) -> None:
        """Scale every slice of channel ``c`` by ``factor[c]`` (jointly: the whole group)."""
        for s in self.slices:
            s.scale_(factor)


def member_slice(member: GroupMember, param: Tensor, dim: int) -> ChannelSlice:
    """The slice of ``param`` (one of ``member``'s tensors) along ``dim`` that the member's channels own.

    Indices are the tensor's own: a grouped conv's weight has ``in_channels / groups`` in-channels, and a
    unit of the group owns one column of it (:meth:`~prunebench.groups.GroupMember.param_idxs`).
    """
    idxs = member.param_idxs() if member.idxs.dim() == 2 else member.idxs.reshape(-1, 1)
    index = idxs.reshape(-1).to(device=param.device, dtype=torch.long)
    return ChannelSlice(param, dim, index, idxs.shape[1])


def group_slices(group: PrunableGroup, part: Part) -> GroupSlices:
    """Precompute the slices of ``group.part(part)``; identical (tensor, dim, indices) triples count once."""
    slices: list[ChannelSlice] = []
    for member in group.part(part):
        for p, dim in member.params():
            new = member_slice(member, p, dim)
            if not any(s.param is p and s.dim == dim and torch.equal(s.index, new.index) for s in slices):
                slices.append(new)
    if not slices:
        raise ValueError(f"group {group.name!r} has no learnable tensors in part {part!r}")
    return GroupSlices(group, slices)
