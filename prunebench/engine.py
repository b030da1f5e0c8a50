"""The shared pruning engine: plan which channels go to meet a MACs target, then cut them for real.

Every method goes through this one engine, so methods differ only in how they rank channels (design.md
"Pruning engine"):

* **global greedy** (:func:`plan_global`): every channel of every group gets the method's score
  (normalized within its group when the method says so); channels are removed lowest first until the
  MACs reduction reaches the target, never taking more than ``max_layer_ratio`` of a group, nor its
  last channel;
* **uniform** (:func:`plan_uniform`, methods with ``uniform = True`` such as ThiNet): one fraction of
  every group, found by bisection, and the method's ``select`` picks the channels from calibration
  data.

MACs are not re-traced while channels go: :class:`MacsCostModel` takes fvcore's per-module counts from
one pass and scales each conv/linear/norm layer with its remaining channel counts, which is exact for
those layers (their cost is linear in in- and out-channels). The figure logged is a real fvcore count
of the cut model.

The cut itself is torch-pruning's: each group is asked for again from the dependency graph with the
chosen indices and pruned (as torch-pruning's ``MetaPruner`` does). Groups are disjoint, so cutting one
does not move the indices of another.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunebench.errors import UserError
from prunebench.groups import (
    _NORM_TYPES,
    PrunableGroup,
    Scope,
    _index_mapping_refresh_skipped,
    _is_depthwise,
    build_groups,
)
from prunebench.measure import MacsReport, count_macs
from prunebench.method import Calibration, PruningMethod

_CONV_FC = (nn.modules.conv._ConvNd, nn.Linear)
_OVERSHOOT = 0.005  # fraction of the MACs a global plan may pass its target by before it looks further


@dataclass
class PruneResult:
    """What one pruning step did. ``macs_reduction`` is ``1 - macs_after / reference_macs`` from a real
    fvcore count after the cut (the figure logged); ``seconds`` covers the whole call and ``timings``
    splits it (``count`` is the two fvcore passes)."""

    macs_before: int
    macs_after: int
    macs_conv_fc_after: int
    params_after: int
    macs_reduction: float
    removed: dict[str, int]
    layers: list[dict]
    seconds: float
    reference_macs: int = 0
    timings: dict[str, float] = field(default_factory=dict)


# -- MACs cost model --------------------------------------------------------------------------------


class MacsCostModel:
    """MACs of the model as channels are removed, from one fvcore count.

    A conv/linear layer costs ``F * (cin'/cin) * (cout'/cout)`` where ``F`` is its fvcore count at the
    counted widths; a norm layer or a depthwise conv scales with its single channel count. Everything
    else (pooling, the layers no group touches) is a constant ``rest``. Removing ``k`` channels of a
    group updates every member: out-members lose ``k`` out-channels, in-members ``k * m`` in-channels
    (``m`` features per channel after a flatten).
    """

    def __init__(self, model: nn.Module, groups: Sequence[PrunableGroup], report: MacsReport) -> None:
        names = {m: n for n, m in model.named_modules()}
        index: dict[nn.Module, int] = {}
        flops: list[float] = []
        cin0: list[float] = []
        cout0: list[float] = []
        self.terms: list[list[tuple[int, bool, int]]] = []
        for g in groups:
            terms = []
            for mem in g.members:
                if mem.module not in index:
                    index[mem.module] = len(flops)
                    cin, cout = _cost_dims(mem.module)
                    flops.append(float(report.by_module.get(names[mem.module], 0)))
                    cin0.append(float(cin))
                    cout0.append(float(cout))
                out_axis = mem.kind == "out" or _is_single(mem.module)
                terms.append((index[mem.module], out_axis, int(mem.idxs.shape[1])))
            self.terms.append(terms)
        self.flops, self.cin0, self.cout0 = flops, cin0, cout0
        self.cin, self.cout = list(cin0), list(cout0)
        self.rest = float(report.macs) - sum(flops)
        self.macs = float(report.macs)

    def remove(self, group: int, k: int, commit: bool = True) -> float:
        """Account for removing ``k`` channels of group ``group``; returns the new MACs.

        With ``commit=False`` nothing changes: the figure is what the removal *would* give.
        """
        macs, cin, cout = self.macs, {}, {}
        for j, out, m in self.terms[group]:
            n = k * m
            ci, co = cin.get(j, self.cin[j]), cout.get(j, self.cout[j])
            if out:
                macs -= self.flops[j] * (ci / self.cin0[j]) * n / self.cout0[j]
                cout[j] = co - n
            else:
                macs -= self.flops[j] * (co / self.cout0[j]) * n / self.cin0[j]
                cin[j] = ci - n
        if commit:
            self.macs = macs
            for j, v in cin.items():
                self.cin[j] = v
            for j, v in cout.items():
                self.cout[j] = v
        return macs

    def macs_for(self, counts: np.ndarray) -> float:
        """MACs after removing ``counts[g]`` channels of every group ``g`` from the counted model
        (ignores earlier :meth:`remove` calls: the uniform plan evaluates whole plans)."""
        rem_in = np.zeros(len(self.flops))
        rem_out = np.zeros(len(self.flops))
        for g, terms in enumerate(self.terms):
            if counts[g]:
                for j, out, m in terms:
                    (rem_out if out else rem_in)[j] += counts[g] * m
        cin0, cout0 = np.asarray(self.cin0), np.asarray(self.cout0)
        scale = (cin0 - rem_in) / cin0 * (cout0 - rem_out) / cout0
        return self.rest + float(np.dot(np.asarray(self.flops), scale))


def _cost_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) channel counts a layer's cost is proportional to; ``in = 1`` for single-count layers."""
    if _is_single(module):
        return 1, _channels(module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _is_single(module: nn.Module) -> bool:
    """Norm layers and depthwise convs: cost scales with one channel count."""
    return isinstance(module, _NORM_TYPES) or _is_depthwise(module)


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    return module.num_features


# -- planning ---------------------------------------------------------------------------------------


def score_groups(method: PruningMethod, groups: Sequence[PrunableGroup]) -> list[Tensor]:
    """Every group's channel scores (float64, CPU), normalized within the group as the method asks."""
    out = []
    with torch.no_grad():
        for g in groups:
            s = torch.as_tensor(method.score(g)).detach().to("cpu", torch.float64).reshape(-1)
            if s.numel() != g.size or not bool(torch.isfinite(s).all()):
                raise UserError(
                    f"method {method.name!r} returned {s.numel()} scores (non-finite: "
                    f"{int((~torch.isfinite(s)).sum())}) for group {g.name!r} of {g.size} channels; "
                    "score() must return one finite score per channel"
                )
            if method.normalize == "max":
                s = s / s.abs().max().clamp_min(1e-300)
            elif method.normalize == "sum":
                s = s / s.abs().sum().clamp_min(1e-300)
            out.append(s)
    return out


def layer_cap(size: int, max_layer_ratio: float, round_to: int | None = None) -> int:
    """Most channels a group of ``size`` may lose: ``max_layer_ratio`` of it, never all of it, and (with
    ``round_to``) only down to a multiple of ``round_to``."""
    cap = min(math.floor(max_layer_ratio * size + 1e-9), size - 1)
    if _rounds(size, round_to):
        assert round_to is not None
        cap = size - math.ceil((size - cap) / round_to) * round_to
    return max(cap, 0)


def _rounds(size: int, round_to: int | None) -> bool:
    return round_to is not None and round_to > 1 and size > round_to


def _chunk(size: int, removed: int, round_to: int | None) -> int:
    """How many channels the next removal from a group takes: one, or (with ``round_to``) down to the
    next multiple of ``round_to``."""
    if not _rounds(size, round_to):
        return 1
    assert round_to is not None
    remaining = size - removed
    return remaining - ((remaining - 1) // round_to) * round_to


def plan_global(
    groups: Sequence[PrunableGroup],
    scores: Sequence[Tensor],
    cost: MacsCostModel,
    target_macs: float,
    *,
    max_layer_ratio: float = 0.8,
    round_to: int | None = None,
) -> list[Tensor]:
    """Global greedy: remove the lowest-scoring channels until MACs fall to ``target_macs``.

    Returns, per group, the channel indices to remove. One ranking for all groups (ties keep group
    order); a channel is skipped once its group reached its cap. With ``round_to`` a removal takes the
    group's lowest channels down to the next multiple of ``round_to``. Raises :class:`UserError` when
    the caps leave the target out of reach.
    """
    sizes = [g.size for g in groups]
    caps = [layer_cap(n, max_layer_ratio, round_to) for n in sizes]
    orders = [torch.argsort(s, stable=True) for s in scores]
    ranks = torch.cat([torch.empty_like(o).scatter_(0, o, torch.arange(o.numel())) for o in orders])
    gids = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    glob = torch.argsort(torch.cat(list(scores)), stable=True)
    removed = [0] * len(groups)
    goal = target_macs * (1 + 1e-12)
    # A removal that would overshoot the target by more than this closes its group instead, and the
    # ranking goes on with the other groups' (cheaper) channels. Where one channel is worth several
    # percent of the MACs (a 32x32 stage of ResNet-8: ~2.4%), rank order alone could land that far past
    # the target; order *within* each group is always kept.
    slack = _OVERSHOOT * cost.macs
    closed: set[int] = set()
    if cost.macs > goal:
        for g, r in zip(gids[glob].tolist(), ranks[glob].tolist()):
            if g in closed or r < removed[g]:
                continue  # closed, or taken already with an earlier chunk
            k = _chunk(sizes[g], removed[g], round_to)
            if removed[g] + k > caps[g]:
                continue  # the group is at its cap; its later channels fail this check too
            after = cost.remove(g, k, commit=False)
            if after <= goal and target_macs - after > slack:
                closed.add(g)
                continue
            cost.remove(g, k)
            removed[g] += k
            if after <= goal:
                break
        else:
            # Every open group ran out before the target: finish with the least-overshooting next channel.
            options = [(cost.remove(h, kh, commit=False), h, kh) for h in range(len(groups))
                       for kh in [_chunk(sizes[h], removed[h], round_to)] if removed[h] + kh <= caps[h]]
            reaching = [o for o in options if o[0] <= goal]
            if not reaching:
                _unreachable(cost.macs, target_macs, max_layer_ratio)
            _, h, kh = max(reaching)
            cost.remove(h, kh)
            removed[h] += kh
    return [o[:n] for o, n in zip(orders, removed)]


def plan_uniform(
    groups: Sequence[PrunableGroup],
    method: PruningMethod,
    cost: MacsCostModel,
    target_macs: float,
    *,
    max_layer_ratio: float = 0.8,
    round_to: int | None = None,
    calib: Calibration | None = None,
) -> list[Tensor]:
    """The same fraction ``r`` of every group (``floor(r * size)`` channels, capped), the smallest ``r``
    that meets ``target_macs`` (up to one channel per group, see :func:`_fill_step`); the channels are
    chosen by ``method.select`` (which may rewrite the kept weights) or else are the group's lowest
    scores."""
    sizes = np.asarray([g.size for g in groups])
    caps = np.asarray([layer_cap(int(n), max_layer_ratio, round_to) for n in sizes])

    def counts(r: float) -> np.ndarray:
        n = np.floor(r * sizes + 1e-9).astype(np.int64)
        if round_to is not None and round_to > 1:
            rounded = sizes > round_to
            keep = np.ceil((sizes - n) / round_to) * round_to
            n = np.where(rounded, sizes - keep, n).astype(np.int64)
        return np.minimum(n, caps)

    n_remove = np.zeros(len(groups), dtype=np.int64)
    if cost.macs > target_macs * (1 + 1e-12):
        if cost.macs_for(counts(1.0)) > target_macs * (1 + 1e-12):
            _unreachable(cost.macs_for(counts(1.0)), target_macs, max_layer_ratio)
        # Bisect over the ratios where some floor(r * size) steps (k / size), not over the reals:
        # every r then gives one consistent count per group.
        ratios = np.unique(np.concatenate([np.arange(n + 1) / n for n in set(sizes.tolist())]))
        lo, hi = 0, len(ratios) - 1  # counts(ratios[hi]) meets the target, counts(ratios[lo]) not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cost.macs_for(counts(ratios[mid])) <= target_macs * (1 + 1e-12) else (mid, hi)
        n_remove = _fill_step(cost, counts(ratios[lo]), counts(ratios[hi]), target_macs)
    overrides = type(method).select is not PruningMethod.select
    plan = []
    for g, n in zip(groups, n_remove.tolist()):
        idx = _select(method, g, n, calib) if n and overrides else None
        if idx is None:
            idx = torch.argsort(score_groups(method, [g])[0], stable=True)[:n] if n else torch.empty(0, dtype=torch.long)
        plan.append(idx)
    return plan


def _fill_step(cost: MacsCostModel, below: np.ndarray, above: np.ndarray, target_macs: float) -> np.ndarray:
    """Between two adjacent ratios, give the extra channel only to as many of the groups that step as
    the target needs (in model order), instead of to all of them at once.

    Where groups of 16, 32 and 64 channels all step at 7/16 = 14/32 = 28/64, taking the whole step
    would overshoot a 40% target by several percent; this keeps every group within one channel of the
    common ratio and the achieved reduction within one channel's MACs of the target.
    """
    n = below.copy()
    for g in np.flatnonzero(above > below):
        n[g] = above[g]
        if cost.macs_for(n) <= target_macs * (1 + 1e-12):
            break
    return n


def _select(method: PruningMethod, group: PrunableGroup, n: int, calib: Calibration | None) -> Tensor | None:
    """``method.select`` with its answer checked: ``n`` distinct channel indices of the group."""
    if calib is None:
        raise UserError(f"method {method.name!r} selects channels from calibration data; pass calib=Calibration(...)")
    with torch.no_grad():
        idx = method.select(group, n, calib)
    if idx is None:
        return None
    idx = torch.as_tensor(idx).to("cpu", torch.long).reshape(-1)
    if idx.numel() != n or idx.unique().numel() != n or int(idx.min()) < 0 or int(idx.max()) >= group.size:
        raise UserError(
            f"method {method.name!r}: select() must return {n} distinct channel indices in [0, {group.size}) "
            f"for group {group.name!r}, got {idx.tolist()[:10]}"
        )
    return idx


def _unreachable(best_macs: float, target_macs: float, max_layer_ratio: float) -> None:
    raise UserError(
        f"cannot reach the MACs target ({target_macs / 1e6:.2f} M MACs): the prunable groups, capped at "
        f"max_layer_ratio={max_layer_ratio}, only get down to {best_macs / 1e6:.2f} M; raise "
        "prune.max_layer_ratio, use prune.scope 'all', or lower the target"
    )


# -- cutting ---------------------------------------------------------------------------------------


def cut(graph: Any, groups: Sequence[PrunableGroup], plan: Sequence[Tensor]) -> None:
    """Remove the planned channels for real, group by group, through the dependency graph.

    torch-pruning refreshes every concat/split index mapping before it hands out a group (seconds on
    DenseNet-121). Only cutting a coupled group can move those offsets (an internal group passes
    through no concat or split), so the refresh runs only after such a cut.
    """
    stale = False
    for g, idx in zip(groups, plan):
        if idx.numel():
            with contextlib.nullcontext() if stale else _index_mapping_refresh_skipped():
                graph.get_pruning_group(g.root, g.tp_fn, sorted(idx.tolist())).prune()
            stale = g.coupled


def _layer_dims(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    return {
        n: (type(m).__name__, *(
            (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
        ))
        for n, m in model.named_modules()
        if isinstance(m, _CONV_FC)
    }


def _layer_table(before: dict[str, tuple[str, int, int]], after: dict[str, tuple[str, int, int]]) -> list[dict]:
    return [
        {
            "name": n,
            "type": t,
            "in_before": cin,
            "in_after": after[n][1],
            "out_before": cout,
            "out_after": after[n][2],
        }
        for n, (t, cin, cout) in before.items()
    ]


# -- entry point -----------------------------------------------------------------------------------


def prune_to_target(
    model: nn.Module,
    method: PruningMethod,
    target: float,
    example_input: Tensor,
    *,
    reference_macs: float | None = None,
    scope: Scope = "auto",
    max_layer_ratio: float = 0.8,
    ignored_layers: Iterable[str] = (),
    calib: Calibration | None = None,
    round_to: int | None = None,
) -> PruneResult:
    """Prune ``model`` in place until its MACs are ``(1 - target) * reference_macs``.

    ``reference_macs`` defaults to the model's current MACs; pass the dense model's figure for the
    later steps of iterative pruning so every step's target stays relative to dense (a step whose
    target is already met removes nothing). ``method.attach(model, groups)`` is called with the fresh
    groups before scoring, and again after the cut with the groups of the pruned model, so the
    method's regularizer can go on training it (iterative pruning).
    """
    if not 0.0 <= target < 1.0:
        raise UserError(f"pruning target must be a MACs reduction in [0, 1), got {target}")
    if not 0.0 < max_layer_ratio <= 1.0:
        raise UserError(f"prune.max_layer_ratio must be in (0, 1], got {max_layer_ratio}")
    timings: dict[str, float] = {}
    t_start = t = time.perf_counter()
    before = count_macs(model, example_input)
    timings["count"] = time.perf_counter() - t
    ref = float(reference_macs) if reference_macs else float(before.macs)

    t = time.perf_counter()
    graph, groups = build_groups(model, example_input, scope=scope, ignored_layers=ignored_layers)
    cost = MacsCostModel(model, groups, before)
    method.attach(model, groups)
    timings["groups"] = time.perf_counter() - t

    t = time.perf_counter()
    target_macs = ref * (1.0 - target)
    if method.uniform:
        plan = plan_uniform(groups, method, cost, target_macs, max_layer_ratio=max_layer_ratio, round_to=round_to, calib=calib)
    else:
        scores = score_groups(method, groups)
        plan = plan_global(groups, scores, cost, target_macs, max_layer_ratio=max_layer_ratio, round_to=round_to)
    timings["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    dims_before = _layer_dims(model)
    cut(graph, groups, plan)
    _, fresh = build_groups(model, example_input, scope=scope, ignored_layers=ignored_layers)
    method.attach(model, fresh)  # the old groups index channels that are gone
    timings["cut"] = time.perf_counter() - t

    t = time.perf_counter()
    after = count_macs(model, example_input)
    timings["count"] += time.perf_counter() - t
    return PruneResult(
        macs_before=before.macs,
        macs_after=after.macs,
        macs_conv_fc_after=after.macs_conv_fc,
        params_after=after.params,
        macs_reduction=1.0 - after.macs / ref,
        removed={g.name: int(p.numel()) for g, p in zip(groups, plan)},
        layers=_layer_table(dims_before, _layer_dims(model)),
        seconds=time.perf_counter() - t_start,
        reference_macs=int(ref),
        timings=timings,
    )
