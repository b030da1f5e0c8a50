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

Three refinements over torch-pruning's raw groups (docs/methods.md, "Prunable groups"):

* **Gates are not merges.** ``x * gate(x)`` -- squeeze-excitation, ECA, any channel attention whose gate
  is computed from the same tensor -- ties no channel to another producer; the gate's convs follow the cut
  (reduce conv's in-channels, expand conv's out-channels) and are never the group's root.
* **Grouped convolutions** (``groups`` > 1, not depthwise) keep every conv group at the same width: a
  group channel is then a *unit* of ``L`` channels, one at the same offset in each of the ``L`` blocks
  (``idxs`` has ``L * m`` columns); :meth:`GroupMember.param_idxs` gives a grouped weight's own
  ``in_channels / groups`` in-channel indices.
* **Partial members.** Where a split sends some channels to one layer and some to another (MixNet's
  mixed kernels, CSP's halves), the channels are split into sub-groups of equal coverage, one
  :class:`PrunableGroup` each (names ``root``, ``root[1]``, ...), cut together.

A group the engine cannot cut safely -- a grouped layer whose channels do not form equal units, a layer
type it does not know -- is left whole, with one warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning.dependency import index_mapping

from prunebench.depgraph import (
    NORM_TYPES,
    GraphRules,
    TooManyIndices,
    all_groups,
    bounded_search,
    channel_groups,
    is_coupled,
    norm_after,
    order_split_outputs,
    remaps,
    tolerant_concat_mapping,
    unknown_layer,
)
from prunebench.errors import UserError, close_matches

logger = logging.getLogger(__name__)

Part = Literal["all", "out", "in", "root"]


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

    def param_idxs(self) -> Tensor:
        """``idxs`` in the member's own weight indices: for the in-side of a grouped conv, whose weight has
        ``in_channels / groups`` in-channels, a unit's in-channels (the same offset in every conv group)
        are that offset's column of the weight, ``[size, L * m / groups]``; ``idxs`` otherwise."""
        groups = channel_groups(self.module)
        if self.kind != "in" or groups == 1 or not isinstance(self.module, nn.modules.conv._ConvNd):
            return self.idxs
        per = self.module.in_channels // groups
        rows = self.idxs.sort(dim=1).values % per
        if rows.shape[1] % groups:  # not a unit (a hand-built group): each in-channel's column
            return rows
        return rows.reshape(rows.shape[0], groups, -1)[:, 0, :]


@dataclass(eq=False)
class PrunableGroup:
    """A set of channels that can only be removed together (see the module docstring).

    ``coupled`` is true when the channels are tied to a residual sum or a concatenation, i.e. when the
    group is outside the ``internal`` scope. ``root`` and ``tp_fn`` let the engine ask the dependency
    graph for the group again when it cuts (:meth:`root_channels`). ``norm`` is the normalization layer
    right after the root, where the graph shows one.
    """

    name: str
    root: nn.Module
    size: int
    members: list[GroupMember]
    coupled: bool = False
    tp_fn: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    norm: nn.Module | None = None

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
            norm = next((m for m in outs if m.is_norm and (self.norm is None or m.module is self.norm)), None)
            return root + ([norm] if norm is not None else [])
        return [m for m in self.members if m.kind == part]

    def root_member(self) -> GroupMember:
        """The root layer's out-member (its filters)."""
        return next(m for m in self.members if m.kind == "out" and m.module is self.root)

    def root_channels(self, channels: Tensor) -> list[int]:
        """The root layer's out-channel indices of the group channels ``channels`` (sorted)."""
        idxs = self.root_member().idxs
        return sorted(idxs[channels.to(idxs.device, torch.long)].reshape(-1).tolist())

    def consumers(self) -> list[GroupMember]:
        """The ``in`` members that are convolutions or linear layers (what reads this group's output)."""
        return [m for m in self.members if m.kind == "in" and isinstance(m.module, (nn.Conv2d, nn.Linear))]

    def norm_layer(self) -> nn.Module | None:
        """The normalization layer on the producer side (for BN-gamma methods such as slimming)."""
        return next((m.module for m in self.part("root") if m.is_norm), None)


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
    and residual nets) and ``all`` otherwise (DenseNet without bottlenecks has no internal pair); the
    engine's ``auto`` also asks whether ``internal`` reaches the target. Groups come in the model's module
    order, so their order does not depend on tracing details. Groups left whole are named in one warning.
    """
    if scope not in _SCOPES:
        raise UserError(f"unknown pruning scope {scope!r}; use one of {', '.join(_SCOPES)}")
    ignored_layers, names = list(ignored_layers), {m: n for n, m in model.named_modules()}
    frozen = _default_never_prune(model) + _resolve_modules(model, ignored_layers, "prune.ignored_layers")
    frozen += _resolve_modules(model, never_prune, "never_prune")

    device = next(model.parameters()).device
    was_training = model.training
    left_whole: dict[str, list[str]] = {}
    unmapped: list[Any] = []
    try:
        with torch.enable_grad(), tolerant_concat_mapping(unmapped):  # torch-pruning traces through autograd
            graph = tp.DependencyGraph().build_dependency(
                model, example_input.to(device), customized_pruners=customized_pruners(), verbose=False
            )
        order_split_outputs(graph)
        rules = GraphRules.of(graph, unmapped)  # before the groups: it detaches channel-agnostic gates
        failed: dict[str, list[nn.Module]] = {}
        with index_mapping_refresh_skipped():
            tp_groups = list(all_groups(graph, frozen, failed))
    finally:
        model.train(was_training)  # tracing leaves the model in eval mode
    for why, roots in failed.items():
        left_whole[why] = [names.get(m, "?") for m in roots]

    groups = [g for tg in tp_groups for g in _convert(graph, tg, names, rules, left_whole)]
    order = {m: i for i, m in enumerate(names)}
    groups.sort(key=lambda g: (order[g.root], g.name))
    _warn_left_whole(left_whole)
    whole = sum(len(v) for v in left_whole.values())
    return graph, _apply_scope(groups, scope, ignored_layers, whole)


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


def _warn_left_whole(left_whole: dict[str, list[str]]) -> None:
    """One warning per reason, naming the first few layers (and once per process for the same text)."""
    for why, layers in left_whole.items():
        shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
        msg = f"left whole (not pruned): {len(layers)} channel group(s) rooted at {shown}: {why}"
        if msg not in _WARNED:
            _WARNED.add(msg)
            logger.warning(msg)


_WARNED: set[str] = set()


def _convert(
    graph: Any, tp_group: Any, names: dict[nn.Module, str], rules: GraphRules, left_whole: dict[str, list[str]]
) -> list[PrunableGroup]:
    """The :class:`PrunableGroup` s of one torch-pruning group with full indices: one, or one per set of
    channels that every member covers alike (a split sends part of the channels to a layer); none where
    the engine cannot cut it safely (the reason goes to ``left_whole``)."""
    root_item = tp_group[0]
    root: nn.Module = root_item.dep.target.module
    size = len(root_item.idxs)
    if any(item.dep.target in rules.fixed for item in tp_group):
        left_whole.setdefault("its channels pass a split or slice of fixed sizes", []).append(names[root])
        return []
    items = []
    for item in tp_group:
        module = item.dep.target.module
        unknown = unknown_layer(module, _PRUNERS)
        if unknown:
            left_whole.setdefault(unknown, []).append(names[root])
            return []
        if not isinstance(module, _MEMBER_TYPES):
            continue  # dummy ops (add, concat, reshape, ...) carry no weights
        out = graph.is_out_channel_pruning_fn(item.dep.handler) or isinstance(module, NORM_TYPES)
        items.append((module, "out" if out else "in", item))
    coupled = is_coupled(tp_group, [m for m, kind, _ in items if kind == "out"], rules)
    extra = {"remaps": remaps(tp_group)}
    groups = []
    classes = _coverage_classes(items, size)
    for k, channels in enumerate(classes):
        members = []
        for module, kind, item in items:
            idxs = _aligned_idxs(item.idxs, item.root_idxs, channels)
            if idxs is not None:
                members.append(GroupMember(names[module], module, kind, idxs))
        name = names[root] if k == 0 else f"{names[root]}[{k}]"
        group = PrunableGroup(
            name, root, len(channels), members, coupled=coupled, tp_fn=root_item.dep.handler, extra=dict(extra)
        )
        if not any(m.module is root and m.kind == "out" for m in members):
            left_whole.setdefault("the root layer does not cover every channel", []).append(name)
            continue
        group = _reroot(graph, group, names, rules)
        why = _untied(graph, group) if len(classes) > 1 else None
        why = why or _unitize(group)
        if why:
            left_whole.setdefault(why, []).append(name)
            continue
        group.norm = norm_after(graph, group.root, rules.neutral)
        groups.append(group)
    return groups


def _untied(graph: Any, group: PrunableGroup) -> str | None:
    """Why a sub-group's channels are tied to channels outside it, or ``None``: the dependency graph asked
    for the sub-group alone must give back exactly its members' indices (a split group's recorded indices
    can miss a tie that a second path to the same producer makes)."""
    channels = group.root_channels(torch.arange(group.size))
    try:
        with index_mapping_refresh_skipped(), bounded_search():
            asked = graph.get_pruning_group(group.root, group.tp_fn, channels)
    except TooManyIndices as exc:
        return str(exc)
    got: dict[tuple[int, str], set[int]] = {}
    for item in asked:
        module = item.dep.target.module
        if isinstance(module, _MEMBER_TYPES):
            out = graph.is_out_channel_pruning_fn(item.dep.handler) or isinstance(module, NORM_TYPES)
            got.setdefault((id(module), "out" if out else "in"), set()).update(int(i) for i in item.idxs)
    mine: dict[tuple[int, str], set[int]] = {}
    for m in group.members:
        mine.setdefault((id(m.module), m.kind), set()).update(m.idxs.reshape(-1).tolist())
    return None if got == mine else "a split's parts are tied to each other through a shared producer"


def _coverage_classes(items: list, size: int) -> list[Tensor]:
    """The root channels split by how many indices each member gives them (one class in most groups)."""
    if not items:
        return [torch.arange(size)]
    roots = [torch.as_tensor(list(item.root_idxs), dtype=torch.long) for _, _, item in items]
    counts = torch.stack([torch.bincount(r, minlength=size)[:size] for r in roots])
    if bool((counts == counts[:, :1]).all()):
        return [torch.arange(size)]
    _, inverse = torch.unique(counts.t(), dim=0, return_inverse=True)
    classes = [torch.nonzero(inverse == c).reshape(-1) for c in range(int(inverse.max()) + 1)]
    return sorted(classes, key=lambda c: int(c[0]))


def _aligned_idxs(idxs: list, root_idxs: list, channels: Tensor) -> Tensor | None:
    """``[len(channels), m]`` indices whose row ``c`` holds what root channel ``channels[c]`` owns in this
    member; ``None`` when the member owns nothing of these channels."""
    idx = torch.as_tensor(list(idxs), dtype=torch.long)
    root = torch.as_tensor(list(root_idxs), dtype=torch.long)
    keep = torch.isin(root, channels)
    if not bool(keep.any()):
        return None
    idx, root = idx[keep], root[keep]
    order = torch.argsort(root * (int(idx.max()) + 1) + idx)  # by root channel, then own index
    return idx[order].reshape(len(channels), -1)


def _unitize(group: PrunableGroup) -> str | None:
    """Make a group channel a unit of ``L`` channels, one in each of the ``L`` equal blocks of the group's
    grouped layers (``L`` the lcm of their ``groups``), so that every conv group keeps the same width, as
    torch-pruning's own pruners do. Returns why the group must stay whole, or ``None``."""
    blocks = math.lcm(*(channel_groups(m.module) for m in group.members))
    if blocks == 1:
        return None
    if group.size % blocks:
        return f"grouped layer: {group.size} channels do not split into {blocks} equal blocks"
    units = group.size // blocks
    rows = torch.arange(group.size).reshape(blocks, units).t()  # unit u: channels u, u + units, ...
    for m in group.members:
        m.idxs = m.idxs[rows].reshape(units, -1)
    for m in group.members:
        groups = channel_groups(m.module)
        if groups == 1:
            continue
        mod = m.module
        width = mod.in_channels if m.kind == "in" else getattr(mod, "out_channels", getattr(mod, "num_channels", 0))
        per = width // groups
        v = m.idxs.sort(dim=1).values.reshape(units, groups, -1)
        same_block = bool((v // per == torch.arange(groups)[None, :, None]).all()) if v.numel() else False
        if not same_block or (m.kind == "in" and not bool((v % per == v[:, :1] % per).all())):
            return f"grouped layer {m.name}: the channels do not form equal units across its {groups} groups"
    group.size = units
    return None


def _reroot(graph: Any, group: PrunableGroup, names: dict[nn.Module, str], rules: GraphRules) -> PrunableGroup:
    """Make the producing conv the root when torch-pruning rooted the group at a depthwise conv or at a
    gate's conv, so that ``root`` means the same thing in every group (OICSR's producer layer): among the
    producing convs of the group, one followed by its normalization layer first."""
    if rules.is_producer(group.root):
        return group
    cands = [m for m in group.members if m.kind == "out" and rules.is_producer(m.module)]
    cands.sort(key=lambda m: norm_after(graph, m.module, rules.neutral) is None)
    if not cands:
        return group
    cand = cands[0]
    order = torch.argsort(cand.idxs[:, 0])
    for m in group.members:
        m.idxs = m.idxs[order]
    suffix = group.name[len(names[group.root]) :]  # a sub-group's "[k]"
    group.root, group.name = cand.module, names[cand.module] + suffix
    group.tp_fn = graph.get_pruner_of_module(cand.module).prune_out_channels
    return group


def _apply_scope(
    groups: list[PrunableGroup], scope: Scope, ignored: list[str | nn.Module], whole: int = 0
) -> list[PrunableGroup]:
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
    elif whole:
        hint = f"; {whole} groups are left whole because the engine cannot cut them (see the warning)"
    else:
        hint = "; the model has no conv/linear channels to prune besides the stem and the classifier"
    raise UserError(
        f"nothing to prune: scope {scope!r}{what} leave no prunable channel group "
        f"({len(groups)} groups in all, {len(internal)} internal){hint}"
    )
