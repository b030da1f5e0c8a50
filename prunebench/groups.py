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
root layer. Per-channel norms of a group or a part of it are :mod:`prunebench.norms`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning.dependency import index_mapping

from prunebench.errors import UserError, close_matches

Part = Literal["all", "out", "in", "root"]

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


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
        return isinstance(self.module, NORM_TYPES)


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

    def consumers(self) -> list[GroupMember]:
        """The ``in`` members that are convolutions or linear layers (what reads this group's output)."""
        return [m for m in self.members if m.kind == "in" and isinstance(m.module, (nn.Conv2d, nn.Linear))]

    def norm_layer(self) -> nn.Module | None:
        """The normalization layer on the producer side (for BN-gamma methods such as slimming)."""
        return next((m.module for m in self.part("out") if m.is_norm), None)


# -- building groups from torch-pruning's dependency graph ------------------------------------------

Scope = Literal["auto", "internal", "all"]
_SCOPES = ("auto", "internal", "all")
_MEMBER_TYPES = (nn.modules.conv._ConvNd, nn.Linear) + NORM_TYPES


def build_groups(
    model: nn.Module,
    example_input: Tensor,
    *,
    scope: Scope = "auto",
    ignored_layers: Iterable[str | nn.Module] = (),
    never_prune: Iterable[str | nn.Module] = (),
) -> tuple[Any, list[PrunableGroup]]:
    """Trace ``model`` with torch-pruning and return its dependency graph and the prunable groups.

    The classifier and the stem are never pruned (their out-channels are the logits and the input to
    the first residual stream), nor are ``ignored_layers`` (module names from a recipe; an unknown name
    is a :class:`UserError`) and ``never_prune`` (modules or names). "Never pruned" means what it means
    in torch-pruning: the layer's out-channels stay, so every group that would remove them is skipped;
    its in-channels may still shrink with the layer that feeds it.

    ``scope``: ``internal`` keeps only groups not tied to a residual sum or a concatenation, ``all``
    keeps every group the library can prune, ``auto`` is ``internal`` where that yields a group (plain
    and residual nets) and ``all`` otherwise (DenseNet without bottlenecks has no internal pair).
    Groups come in the model's module order, so their order does not depend on tracing details.
    """
    if scope not in _SCOPES:
        raise UserError(f"unknown pruning scope {scope!r}; use one of {', '.join(_SCOPES)}")
    ignored_layers, names = list(ignored_layers), {m: n for n, m in model.named_modules()}
    frozen = _default_never_prune(model) + _resolve_modules(model, ignored_layers, "prune.ignored_layers")
    frozen += _resolve_modules(model, never_prune, "never_prune")

    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.enable_grad():  # torch-pruning traces through autograd
            graph = tp.DependencyGraph().build_dependency(
                model, example_input.to(device), customized_pruners=customized_pruners(), verbose=False
            )
        with index_mapping_refresh_skipped():
            tp_groups = list(graph.get_all_groups(ignored_layers=frozen, root_module_types=[nn.Conv2d, nn.Linear]))
    finally:
        model.train(was_training)  # tracing leaves the model in eval mode

    groups = [g for g in (_convert(graph, tg, names) for tg in tp_groups) if g is not None]
    order = {m: i for i, m in enumerate(names)}
    groups.sort(key=lambda g: order[g.root])
    return graph, _apply_scope(groups, scope, ignored_layers)


@contextmanager
def index_mapping_refresh_skipped() -> Iterator[None]:
    """Skip torch-pruning's index-mapping refresh while groups are only enumerated.

    ``get_pruning_group`` recomputes every concat/split index mapping before each group, in case the
    graph was pruned since; while enumerating, nothing is pruned and ``build_dependency`` has just
    computed them, so the refresh is redundant -- and it dominates the time on concatenation-heavy
    networks such as DenseNet.
    The original function is always restored.
    """
    original = index_mapping.update_index_mapping
    index_mapping.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        index_mapping.update_index_mapping = original


def _default_never_prune(model: nn.Module) -> list[nn.Module]:
    classifier, stem = classifier_and_stem(model)
    return [*classifier, *stem]


_PRUNERS: dict[type[nn.Module], type[tp.pruner.function.BasePruningFunc]] = {}


def register_pruner(module_type: type[nn.Module], pruner: type[tp.pruner.function.BasePruningFunc]) -> None:
    """Teach the engine the surgery of a custom layer (torch-pruning's ``customized_pruners``); e.g. the CIFAR
    ResNets' option-A shortcut registers itself when :mod:`prunebench.models` is imported."""
    _PRUNERS[module_type] = pruner


def customized_pruners() -> dict[type[nn.Module], Any]:
    """The ``customized_pruners`` argument of torch-pruning for every registered custom layer."""
    return {t: p() for t, p in _PRUNERS.items()}  # fresh instances: a pruner may keep per-graph state


def classifier_and_stem(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The layers the pruning engine must never cut: the classifier (its outputs are the classes) and the stem.

    Classifier: the Linear (or conv) layers inside timm's ``get_classifier()`` when the model has one (none
    for a headless ``num_classes=0`` model), else the last ``nn.Linear`` in module order. Stem: the first
    ``nn.Conv2d`` in module order (timm and the CIFAR models here define it first). Either list is empty
    when the model has no such layer.
    """
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        heads = head.modules() if isinstance(head, nn.Module) else ()
        classifier = [m for m in heads if isinstance(m, (nn.Linear, nn.Conv2d))]
    else:
        classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return classifier, [stem] if stem is not None else []


def _resolve_modules(model: nn.Module, items: Iterable[str | nn.Module], where: str) -> list[nn.Module]:
    """Module objects for names (or modules passed through); an unknown name is a :class:`UserError`."""
    by_name = dict(model.named_modules())
    out: list[nn.Module] = []
    for item in items:
        if isinstance(item, nn.Module):
            out.append(item)
        elif item in by_name and item != "":
            out.append(by_name[item])
        else:
            known = [n for n in by_name if n]
            raise UserError(f"{where}: {item!r} is not a module of the model.{close_matches(str(item), known)}")
    return out


def _convert(graph: Any, tp_group: Any, names: dict[nn.Module, str]) -> PrunableGroup | None:
    """A :class:`PrunableGroup` from a torch-pruning group with full indices, or ``None`` when some
    member does not map every root channel onto the same number of its own indices (e.g. a split
    that sends only part of the channels to a layer); such groups are left unpruned."""
    root_item = tp_group[0]
    root: nn.Module = root_item.dep.target.module
    size = len(root_item.idxs)
    members: list[GroupMember] = []
    for item in tp_group:
        module = item.dep.target.module
        if not isinstance(module, _MEMBER_TYPES):
            continue  # dummy ops (add, concat, reshape, ...) carry no weights
        idxs = _aligned_idxs(item.idxs, item.root_idxs, size)
        if idxs is None:
            return None
        out = graph.is_out_channel_pruning_fn(item.dep.handler) or isinstance(module, NORM_TYPES)
        members.append(GroupMember(names[module], module, "out" if out else "in", idxs))
    group = PrunableGroup(
        name=names[root],
        root=root,
        size=size,
        members=members,
        coupled=_is_coupled(tp_group, members),
        tp_fn=root_item.dep.handler,
    )
    return _reroot_off_depthwise(graph, group, names)


def _aligned_idxs(idxs: list[int], root_idxs: list[int], size: int) -> Tensor | None:
    """``[size, m]`` indices whose row ``c`` holds what root channel ``c`` owns in this member."""
    idx = torch.as_tensor(list(idxs), dtype=torch.long)
    root = torch.as_tensor(list(root_idxs), dtype=torch.long)
    if idx.numel() == 0 or idx.numel() % size or root.numel() != idx.numel():
        return None
    counts = torch.bincount(root, minlength=size)
    if counts.numel() != size or not bool((counts == idx.numel() // size).all()):
        return None
    order = torch.argsort(root * (int(idx.max()) + 1) + idx)  # by root channel, then own index
    return idx[order].reshape(size, -1)


def _is_coupled(tp_group: Any, members: list[GroupMember]) -> bool:
    """Whether the group is tied to a residual sum, a product with another branch, a concat or a split.

    Element-wise ops with one input (ReLU, pooling) do not couple anything; a merge has two inputs.
    Several producing convs (not counting depthwise ones, whose in and out channels are one and the
    same) also mean a shared stream.
    """
    merge_types = (tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.UNBIND)
    for item in tp_group:
        node = item.dep.target
        if node.type in merge_types:
            return True
        if node.type == tp.ops.OPTYPE.ELEMENTWISE and len(node.inputs) >= 2:
            return True
    producers = [m for m in members if m.kind == "out" and not m.is_norm and not is_depthwise(m.module)]
    return len(producers) > 1


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.out_channels


def _reroot_off_depthwise(graph: Any, group: PrunableGroup, names: dict[nn.Module, str]) -> PrunableGroup:
    """Make the producing (non-depthwise) conv the root when torch-pruning rooted the group at a
    depthwise conv, so that ``root`` means the same thing in every group (OICSR's producer layer)."""
    if not is_depthwise(group.root):
        return group
    cand = next(
        (
            m
            for m in group.members
            if m.kind == "out" and not m.is_norm and not is_depthwise(m.module) and m.idxs.shape[1] == 1
        ),
        None,
    )
    if cand is None:
        return group
    order = torch.argsort(cand.idxs[:, 0])
    for m in group.members:
        m.idxs = m.idxs[order]
    group.root, group.name = cand.module, names[cand.module]
    group.tp_fn = graph.get_pruner_of_module(cand.module).prune_out_channels
    return group


def _apply_scope(groups: list[PrunableGroup], scope: Scope, ignored: list[str | nn.Module]) -> list[PrunableGroup]:
    """Filter by scope; an empty result is a :class:`UserError` naming what left nothing to prune."""
    internal = [g for g in groups if not g.coupled]
    chosen = groups if scope == "all" else internal if scope == "internal" or internal else groups
    if chosen:
        return chosen
    ign = [i if isinstance(i, str) else type(i).__name__ for i in ignored]
    what = f" and ignored layers {ign}" if ign else ""
    if scope == "internal" and groups:
        hint = "; use scope 'all'"
    elif ign:
        hint = "; remove some ignored layers"
    else:
        hint = "; the model has no conv/linear channels to prune besides the stem and the classifier"
    raise UserError(
        f"nothing to prune: scope {scope!r}{what} leave no prunable channel group "
        f"({len(groups)} groups in all, {len(internal)} internal){hint}"
    )
