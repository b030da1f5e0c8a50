"""What torch-pruning's dependency graph says about channels, beyond its raw groups.

:mod:`prunebench.groups` turns the library's groups into :class:`~prunebench.groups.PrunableGroup` s; this
module reads the graph for the facts it needs to do that right (docs/methods.md, "Prunable groups"):

* :func:`all_groups` -- the library's ``get_all_groups`` with sets for the visited layers (it keeps
  lists: quadratic on large models), and a root whose group the library cannot build left whole instead of
  ending the search;
* :class:`GraphRules` -- the channel-gate multiplies ``x * gate(x)`` (squeeze-excitation, ECA, any channel
  attention computed from the same tensor), the conv/linear layers of their gate branches, and the
  split/concat pairs that only reassemble one tensor (MixNet's mixed kernels); none of them couples a
  channel to another producer (:func:`is_coupled`); and the splits, slices and concats a cut must not
  pass (sizes the model keeps, widths torch-pruning cannot infer);
* :func:`unknown_layer` -- a layer in a group that the cut would not resize (the group is left whole);
* :func:`channel_groups`, :func:`is_depthwise`, :func:`norm_after` -- facts about one layer;
* :func:`refresh_split_offsets`, :func:`sync_split_sizes` -- after a cut, the split offsets torch-pruning
  maps indices with, and the split sizes a layer keeps as plain attributes (timm's ``MixedConv2d``).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch_pruning as tp
from timm.layers import MixedConv2d
from torch import nn
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.group import Group

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)

_OP = tp.ops.OPTYPE
_WEIGHTED = (_OP.CONV, _OP.LINEAR, _OP.DEPTHWISE_CONV, _OP.BN, _OP.LN, _OP.GN, _OP.IN, _OP.PRELU)
_MERGES = (_OP.CONCAT, _OP.SPLIT, _OP.SLICE, _OP.UNBIND)
_GATE_DEPTH = 16  # nodes from a gate's activation back to the gated tensor (SE: 6, ECA: 7)


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.out_channels


def channel_groups(module: nn.Module) -> int:
    """How many equal blocks a layer's channels form: a grouped (not depthwise) conv's ``groups``, a
    GroupNorm's ``num_groups``; 1 otherwise."""
    if isinstance(module, nn.modules.conv._ConvNd) and not is_depthwise(module):
        return int(module.groups)
    if isinstance(module, nn.GroupNorm):
        return int(module.num_groups)
    return 1


_MAX_MAPPED = 1 << 16  # indices a group may map through reshapes (a flatten before a linear layer: C*H*W)
_MAX_DEPS = 1000  # dependencies in one group (DenseNet-161: 150; DPN's sliced dual paths do not close)


class TooManyIndices(Exception):
    """A group's search grew past its bounds (:func:`bounded_search`)."""


@contextmanager
def bounded_search() -> Iterator[list[int]]:
    """Bound torch-pruning's search for a group: more than ``_MAX_MAPPED`` indices mapped through reshapes
    (ResNeSt's split attention reshapes the channels into radix x C / radix: millions of indices, minutes
    per model) or more than ``_MAX_DEPS`` dependencies (DPN's dual paths slice the channels: the search
    does not close) raise :class:`TooManyIndices`. Yields the two counters; reset them before each group."""
    counts = [0, 0]
    original, original_add = index_mapping._FlattenIndexMapping.__call__, Group.add_dep

    def counted(self: Any, idxs: Any) -> Any:
        counts[0] += len(idxs) * (1 if self.reverse else int(self._stride))  # before building them
        if counts[0] > _MAX_MAPPED:
            raise TooManyIndices("its channels are reshaped into other dims")
        return original(self, idxs)

    def add_dep(self: Any, dep: Any, idxs: Any) -> None:
        counts[1] += 1
        if counts[1] > _MAX_DEPS:
            raise TooManyIndices(f"no closed group within {_MAX_DEPS} dependencies")
        original_add(self, dep, idxs)

    index_mapping._FlattenIndexMapping.__call__, Group.add_dep = counted, add_dep
    try:
        yield counts
    finally:
        index_mapping._FlattenIndexMapping.__call__, Group.add_dep = original, original_add


def all_groups(graph: Any, frozen: list[nn.Module], failed: dict[str, list[nn.Module]]) -> Iterator[Any]:
    """Every group of out-channels of a conv or linear layer, as torch-pruning's ``get_all_groups`` yields
    them (a group that would cut a ``frozen`` layer's out-channels is skipped); roots whose group the
    library fails to build, or whose search runs past the bounds of :func:`bounded_search`, are added to
    ``failed`` under the reason."""
    visited: set[int] = set()
    ignored = {id(m) for m in [*frozen, *graph.IGNORED_LAYERS_IN_TRACING]}
    # Roots in the model's module order, producers before the layers that follow them (the library's order
    # is the reverse trace's): a depthwise conv reached first from a concat of x and f(x) (GhostNet) would
    # make a group whose recorded indices miss the ties between the two halves.
    in_graph = [m for m in graph.model.modules() if m in graph.module2node]
    with bounded_search() as counts:
        for m in in_graph:
            if id(m) in ignored or id(m) in visited or not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            pruner = graph.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            counts[0] = counts[1] = 0
            try:
                group = graph.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            except TooManyIndices as exc:
                failed.setdefault(str(exc), []).append(m)
                continue
            except Exception as exc:  # a structure torch-pruning cannot follow: that layer stays whole, never a crash
                failed.setdefault(f"torch-pruning could not build the group ({type(exc).__name__})", []).append(m)
                continue
            prunable = True
            for dep, _ in group:
                if graph.is_out_channel_pruning_fn(dep.handler):
                    visited.add(id(dep.target.module))
                    prunable = prunable and id(dep.target.module) not in ignored
            if prunable:
                yield group


@dataclass(frozen=True)
class GraphRules:
    """The gate multiplies and their layers, and the neutral split/concat nodes of one graph."""

    gate_muls: frozenset
    gate_modules: frozenset
    neutral: frozenset
    fixed: frozenset  # channel splits/slices of sizes the model keeps (not neutral, not whole); unmapped concats

    @classmethod
    def of(cls, graph: Any, unmapped: Collection = ()) -> GraphRules:
        """Read the rules off ``graph``; a gate that works on any number of channels (ECA: a conv along the
        channel axis of the pooled vector) is cut out of the graph's dependencies, so that nothing in it
        is asked to follow a cut."""
        muls, mods, neutral = set(), set(), set()
        mixed = {id(c): id(m) for m in graph.model.modules() if isinstance(m, MixedConv2d) for c in m.values()}
        for node in graph.module2node.values():
            if node.type == _OP.ELEMENTWISE and len(node.inputs) == 2 and _is_mul(node):
                a, b = node.inputs
                branch = _gate_branch(b, a, node)
                branch = branch if branch is not None else _gate_branch(a, b, node)
                if branch is not None:
                    muls.add(node)
                    layers = [n.module for n in branch if isinstance(n.module, CONV_LINEAR)]
                    mods.update(layers)
                    if any(n.type == _OP.RESHAPE for n in branch) and all(_channels(m) == (1, 1) for m in layers):
                        _detach(graph, branch)
            elif node.type == _OP.SPLIT and _mixed_conv_input(node, mixed):
                cat = _reassembled_by(node)
                if cat is not None:
                    neutral.update((node, cat))
        fixed = {n for n in graph.module2node.values() if n not in neutral and _cuts_channels(n)} | set(unmapped)
        return cls(frozenset(muls), frozenset(mods), frozenset(neutral), frozenset(fixed))

    def is_producer(self, module: nn.Module) -> bool:
        """A conv or linear layer that makes channels: not depthwise, not inside a gate."""
        return isinstance(module, CONV_LINEAR) and not is_depthwise(module) and module not in self.gate_modules


def _is_mul(node: Any) -> bool:
    fn = node.grad_fn
    return fn is not None and hasattr(fn, "name") and fn.name().startswith("MulBackward")


def _gate_branch(gate: Any, x: Any, mul: Any) -> set | None:
    """The nodes of ``gate``'s branch when it is computed from ``x`` alone (every path back from ``gate``
    reaches ``x`` within a few nodes, and the branch feeds nothing but ``mul``) and ends in an activation,
    not a weighted layer; else ``None``."""
    if gate.type in _WEIGHTED:
        return None
    branch, todo, reached = set(), [gate], False
    while todo:
        node = todo.pop()
        if node is x:
            reached = True
            continue
        if node in branch:
            continue
        branch.add(node)
        if len(branch) > _GATE_DEPTH or not node.inputs:
            return None
        todo.extend(node.inputs)
    inside = branch | {mul}
    if not reached or any(o not in inside for n in branch for o in n.outputs):
        return None
    return branch


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _detach(graph: Any, branch: set) -> None:
    """Remove every dependency into or out of ``branch``: its channels follow nothing and lead nowhere."""
    for node in graph.module2node.values():
        if node in branch:
            node.dependencies = []
        else:
            node.dependencies = [d for d in node.dependencies if d.target not in branch]


def _cuts_channels(node: Any) -> bool:
    """A split, unbind or slice along the channels that keeps fixed sizes: cutting through it would leave
    the sizes the model computes it with (``x.split(self.expand_chs // 2)``, ``x[:, :self.out_chs]``)
    wrong. A slice that keeps every channel (GhostNet's ``[:, :out_chs]`` of exactly ``out_chs``) is fine."""
    fn = node.grad_fn
    if node.type in (_OP.SPLIT, _OP.UNBIND):
        return getattr(fn, "_saved_dim", 1) in (1, -3)
    if node.type != _OP.SLICE:
        return False
    dim, sizes = getattr(fn, "_saved_dim", 1), getattr(fn, "_saved_self_sym_sizes", None)
    if dim not in (1, -3):
        return False
    start, end, step = (getattr(fn, f"_saved_{k}", None) for k in ("start", "end", "step"))
    whole = start in (0, None) and step in (1, None) and sizes is not None and (end is None or end >= sizes[1])
    return not whole


def order_split_outputs(graph: Any) -> None:
    """Put every split's consumers in the order of the parts they read, and redo its index mapping.

    torch-pruning maps part ``i`` of a split to its ``i``-th recorded consumer, but records them in the
    order of the backward trace (last part first): with parts of one size the channels of one part are
    attributed to another's layer (a cut then removes the wrong filters), with unequal parts a cut breaks.
    """
    for node in graph.module2node.values():
        if node.type != _OP.SPLIT or node.grad_fn is None:
            continue
        parts = [
            next((k for fn, k in getattr(o.grad_fn, "next_functions", ()) if fn is node.grad_fn), None)
            for o in node.outputs
        ]
        if None in parts or len(set(parts)) != len(parts):
            continue
        node.outputs = [o for _, o in sorted(zip(parts, node.outputs), key=lambda t: t[0])]
        index_mapping.update_split_index_mapping(graph, node)


def _mixed_conv_input(split: Any, mixed: dict[int, int]) -> bool:
    """Whether ``split`` feeds the convs of one ``MixedConv2d``, whose split sizes :func:`sync_split_sizes`
    keeps right after a cut (another model's split sizes are its own business: Res2Net's ``self.width``)."""
    owners = set()
    for node in split.outputs:
        for _ in range(4):  # through the padding of a Conv2dSame (tf_mixnet_s)
            if isinstance(node.module, CONV_LINEAR) or len(node.inputs) != 1 or len(node.outputs) != 1:
                break
            node = node.outputs[0]
        owners.add(mixed.get(id(node.module)))
    return len(owners) == 1 and None not in owners


def _reassembled_by(split: Any) -> Any:
    """The concat node that joins every output of ``split`` through single-input chains, or ``None``."""
    ends = set()
    for node in split.outputs:
        for _ in range(8):
            if node.type == _OP.CONCAT or len(node.inputs) != 1 or len(node.outputs) != 1:
                break
            node = node.outputs[0]
        ends.add(node if node.type == _OP.CONCAT else None)
    cat = ends.pop() if len(ends) == 1 else None
    return cat if cat is not None and len(cat.inputs) == len(split.outputs) else None


def is_coupled(tp_group: Any, producers: Collection[nn.Module], rules: GraphRules) -> bool:
    """Whether the group is tied to a residual sum, a product with another branch, a concat or a split.

    Element-wise ops with one input (ReLU, pooling) do not couple anything; a merge has two inputs. A
    channel gate ``x * gate(x)`` is no merge, nor is a split whose parts are concatenated back. Several
    ``producers`` (out-side layers that :meth:`GraphRules.is_producer` -- not depthwise convs, whose in and
    out channels are one and the same, nor a gate's convs) also mean a shared stream.
    """
    for item in tp_group:
        node = item.dep.target
        if node in rules.neutral or node in rules.gate_muls:
            continue
        if node.type in _MERGES or (node.type == _OP.ELEMENTWISE and len(node.inputs) >= 2):
            return True
    return len({id(m) for m in producers if rules.is_producer(m)}) > 1


def unknown_layer(module: Any, known: Collection[type]) -> str | None:
    """Why a layer of a group is one the engine does not know how to cut, or ``None``: a module with
    parameters that torch-pruning's pruners (or one of ``known``, the registered custom layers) would not
    resize."""
    if not isinstance(module, nn.Module) or type(module) in known:
        return None
    own = sorted(n for n, _ in module.named_parameters(recurse=False))
    if isinstance(module, (*CONV_LINEAR, *NORM_TYPES)):
        extra = [n for n in own if n not in ("weight", "bias")]
        return (
            f"{type(module).__name__} has parameters ({', '.join(extra)}) the cut would not resize" if extra else None
        )
    if own and not type(module).__module__.startswith("torch_pruning"):
        return f"layer type {type(module).__name__} is not understood by the engine"
    if "Convolution" in str(getattr(module, "_grad_fn", "")):  # F.conv2d with a buffer as weight (BlurPool2d)
        return "a convolution whose weight is not a parameter (e.g. a blur filter) would keep its width"
    return None


def norm_after(graph: Any, module: nn.Module, neutral: Collection = ()) -> nn.Module | None:
    """The normalization layer ``module``'s output reaches through at most a few single-input ops (or a
    ``neutral`` concat that reassembles a split, as after MixNet's mixed kernels)."""
    node = graph.module2node.get(module)
    for _ in range(4):
        if node is None or len(node.outputs) != 1:
            return None
        node = node.outputs[0]
        if isinstance(node.module, NORM_TYPES):
            return node.module
        if node.type in _WEIGHTED or (len(node.inputs) != 1 and node not in neutral):
            return None
    return None


@contextmanager
def tolerant_concat_mapping(unmapped: list) -> Iterator[None]:
    """torch-pruning's concat index mapping, with a concat whose input widths it cannot infer (a ``None``
    among them: ``TypeError`` in ``sum``, CSPDarkNet-3's ``cs3darknet_s``) recorded in ``unmapped`` instead
    of ending the whole trace; groups through it are then left whole (:attr:`GraphRules.fixed`)."""
    original = index_mapping.update_concat_index_mapping

    def update(graph: Any, node: Any) -> None:
        try:
            original(graph, node)
        except TypeError:
            unmapped.append(node)

    index_mapping.update_concat_index_mapping = update
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = original


def remaps(tp_group: Any) -> bool:
    """Whether cutting the group moves a concat/split/slice offset (the engine then refreshes the mappings)."""
    return any(item.dep.target.type in _MERGES for item in tp_group)


def refresh_split_offsets(graph: Any) -> None:
    """torch-pruning updates a split's ``split_sizes`` when a cut goes through it but maps indices with its
    ``offsets``, computed once when the graph was built: recompute them, so that the next group of the same
    graph maps through the split as it now is."""
    for node in graph.module2node.values():
        sizes = getattr(node.module, "split_sizes", None) if node.type == _OP.SPLIT else None
        if sizes is not None:
            node.module.offsets = [0, *itertools.accumulate(sizes)]


def sync_split_sizes(model: nn.Module) -> None:
    """Split sizes kept as attributes, read back from the layers after a cut: timm's ``MixedConv2d``
    splits its input by ``splits``, one part per kernel size."""
    for m in model.modules():
        if isinstance(m, MixedConv2d):
            convs = list(m.values())
            m.splits = [c.in_channels for c in convs]
            m.in_channels, m.out_channels = sum(m.splits), sum(c.out_channels for c in convs)
