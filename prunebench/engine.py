"""The shared pruning engine: plan which channels go to meet a MACs target, then cut them for real.

Every method goes through this one engine, so methods differ only in how they rank channels (docs/design.md
"Pruning engine"):

* **global greedy** (:func:`plan_global`): every channel of every group gets the method's score
  (normalized within its group when the method says so); channels are removed lowest first until the
  MACs reduction reaches the target, never taking more than ``max_layer_ratio`` of a group, nor its
  last channel;
* **uniform** (:func:`plan_uniform`, methods with ``uniform = True`` such as ThiNet): one fraction of
  every group, found by bisection, and the method's ``select`` picks the channels from calibration
  data.

**Matched budgets.** Every method's achieved reduction ``1 - macs_after / reference_macs`` lies in
``[target, target + tol]`` with ``tol = max(0.001, half the share of the reference MACs that the
cheapest prunable channel costs)`` (:func:`budget_tolerance`, ``PruneResult.tolerance``): 0.1
percentage point on ResNet-20 and larger, half a channel on ResNet-8. A method whose next channel is
expensive is thus not compressed harder than another. Where ``round_to``, the caps or (uniform) one
ratio for all groups make the band impossible, the plan is the closest one past the target and one
warning says so.

**Caps.** ``max_layer_ratio`` is a fraction of each group's dense width: iterative pruning passes
``dense_widths`` so that its steps share one cap instead of compounding it (:func:`group_caps`).

MACs are not re-traced while channels go: :class:`MacsCostModel` takes fvcore's per-module counts from
one pass and scales each conv/linear/norm layer with its remaining channel counts, which is exact for
those layers (their cost is linear in in- and out-channels). Only adaptive pooling (and functional ops)
is left out: a tiny share that shrinks where it follows a pruned group, so plans keep a margin for it
inside the band. The figure logged is a real fvcore count of the cut model.

The cut itself is torch-pruning's: each group is asked for again from the dependency graph with the
chosen indices and pruned (as torch-pruning's ``MetaPruner`` does). Groups are disjoint, so cutting one
does not move the indices of another.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunebench.errors import UserError
from prunebench.groups import NORM_TYPES, PrunableGroup, Scope, build_groups, index_mapping_refresh_skipped, is_depthwise
from prunebench.measure import MacsReport, count_macs
from prunebench.method import Calibration, PruningMethod

_CONV_FC = (nn.modules.conv._ConvNd, nn.Linear)
_MIN_TOLERANCE = 0.001  # the matched-budget band is at least 0.1 percentage point of the reference MACs
# Plans aim at the band less a margin (this share of it at least, at most half of it): adaptive pooling is
# outside the cost model, and where it follows a pruned group the real count comes out a little lower
# than planned (MobileNetV2's global pool: up to ~0.015 pp).
_MARGIN = 0.05
_REACH = 4  # chunks per group a global plan may take or give back to land in the band once its ranking ran out

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What one pruning step did. ``macs_reduction`` is ``1 - macs_after / reference_macs`` from a real
    fvcore count after the cut (the figure logged); it lies in ``[target, target + tolerance]`` (the
    matched-budget band, :func:`budget_tolerance`) unless a warning said otherwise. ``seconds`` covers
    the whole call and ``timings`` splits it (``count`` is the two fvcore passes)."""

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
    tolerance: float = 0.0


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
        # The part of `rest` that is not a conv/linear/norm layer outside the groups (adaptive pooling,
        # functional ops): it may shrink with a group the model does not see (a global pool behind a
        # pruned conv), so plans keep a margin for it (see _plan_slack).
        fixed = sum(report.by_module.get(n, 0) for n, m in model.named_modules()
                    if m not in index and isinstance(m, _CONV_FC + NORM_TYPES))
        self.unmodelled = max(self.rest - float(fixed), 0.0)

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
    return isinstance(module, NORM_TYPES) or is_depthwise(module)


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


def group_caps(
    groups: Sequence[PrunableGroup],
    max_layer_ratio: float,
    round_to: int | None = None,
    dense_widths: Mapping[str, int] | None = None,
) -> list[int]:
    """How many more channels each group may lose in this step.

    ``max_layer_ratio`` is a fraction of the *dense* width: with ``dense_widths`` (group name -> width
    before the first pruning step) a group of ``n`` channels with dense width ``d`` may lose
    ``layer_cap(d) - (d - n)`` more (never below 0, never its last channel), so iterative pruning has
    the one-shot cap in total instead of compounding it. Without it (or for a group it does not name)
    the cap is :func:`layer_cap` of the current width.
    """
    caps = []
    for g in groups:
        d = dense_widths.get(g.name) if dense_widths is not None else None
        if d is None or d < g.size:
            caps.append(layer_cap(g.size, max_layer_ratio, round_to))
        else:
            caps.append(max(0, min(layer_cap(int(d), max_layer_ratio, round_to) - (int(d) - g.size), g.size - 1)))
    return caps


def budget_tolerance(
    cost: MacsCostModel,
    groups: Sequence[PrunableGroup],
    reference_macs: float,
    round_to: int | None = None,
    *,
    caps: Sequence[int] | None = None,
) -> float:
    """How far past the target a plan may go, as a fraction of ``reference_macs`` (the matched-budget rule).

    ``max(0.001, c / 2)`` where ``c`` is the share of ``reference_macs`` that the cheapest prunable
    channel (one chunk under ``round_to``) of the model being pruned costs, from ``cost`` as it stands
    (call it before planning). A group with ``caps[g]`` below its first chunk does not count. On
    ResNet-20 and larger this is 0.1 percentage point; on ResNet-8 half a channel.
    """
    cheapest = math.inf
    for g, grp in enumerate(groups):
        k = _chunk(grp.size, 0, round_to)
        if grp.size > 1 and (caps is None or caps[g] >= k):
            cheapest = min(cheapest, cost.macs - cost.remove(g, k, commit=False))
    if not math.isfinite(cheapest) or reference_macs <= 0:
        return _MIN_TOLERANCE
    return max(_MIN_TOLERANCE, 0.5 * cheapest / float(reference_macs))


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


def _unchunk(size: int, removed: int, round_to: int | None) -> int:
    """How many channels giving back the last removal of a group restores (the inverse of :func:`_chunk`)."""
    if not _rounds(size, round_to):
        return 1
    assert round_to is not None
    back = (size - removed) // round_to * round_to + round_to
    return removed if back >= size else removed - (size - back)


def _steps(size: int, removed: int, cap: int, round_to: int | None, reach: int) -> tuple[list[int], list[int]]:
    """Removed counts of a group within ``reach`` chunks of ``removed`` (down to 0, up to ``cap``), and
    how many chunks each is away: ``[removed, +1 chunk, -1 chunk, +2, -2, ...]``, ``[0, 1, 1, 2, 2, ...]``."""
    up, down = [removed], [removed]
    for _ in range(reach):
        if up[-1] < size - 1 and up[-1] + _chunk(size, up[-1], round_to) <= cap:
            up.append(up[-1] + _chunk(size, up[-1], round_to))
        if down[-1] > 0:
            down.append(down[-1] - _unchunk(size, down[-1], round_to))
    counts, moves = [removed], [0]
    for i in range(1, reach + 1):
        for v in (up, down):
            if i < len(v):
                counts.append(v[i])
                moves.append(i)
    return counts, moves


def plan_global(
    groups: Sequence[PrunableGroup],
    scores: Sequence[Tensor],
    cost: MacsCostModel,
    target_macs: float,
    *,
    max_layer_ratio: float = 0.8,
    round_to: int | None = None,
    dense_widths: Mapping[str, int] | None = None,
    reference_macs: float | None = None,
    tolerance: float | None = None,
) -> list[Tensor]:
    """Global greedy: remove the lowest-scoring channels until MACs fall to ``target_macs``, landing
    within the matched-budget band ``[target_macs - tolerance * reference_macs, target_macs]``.

    Returns, per group, the channel indices to remove. One ranking for all groups (ties keep group
    order); a channel is skipped once its group reached its cap (:func:`group_caps`). With ``round_to``
    a removal takes the group's lowest channels down to the next multiple of ``round_to``. A removal
    that would reach the target but land below the band closes its group (the order within a group is
    always kept) and the ranking goes on; the first removal that lands in the band ends the plan. If the
    ranking runs out first, the last removals are adjusted (a few chunks taken or given back per group,
    fewest changes first) to land in the band; where rounding or the caps make that impossible, the
    closest plan that reaches the target is used and one warning says so. ``reference_macs`` defaults
    to the current MACs and ``tolerance`` to :func:`budget_tolerance`. Raises :class:`UserError` when
    the caps leave the target out of reach.
    """
    sizes = [g.size for g in groups]
    caps = group_caps(groups, max_layer_ratio, round_to, dense_widths)
    ref = float(reference_macs) if reference_macs else cost.macs
    tol = budget_tolerance(cost, groups, ref, round_to, caps=caps) if tolerance is None else float(tolerance)
    orders = [torch.argsort(s, stable=True) for s in scores]
    if not groups:
        return []
    ranks = torch.cat([torch.empty_like(o).scatter_(0, o, torch.arange(o.numel())) for o in orders])
    gids = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    glob = torch.argsort(torch.cat(list(scores)), stable=True)
    removed = [0] * len(groups)
    goal = target_macs * (1 + 1e-12)
    # A removal that would land more than `slack` below the target closes its group instead, and the
    # ranking goes on with the other groups' (cheaper) channels. Where one channel is worth several
    # percent of the MACs (a 32x32 stage of ResNet-8: ~2.4%), rank order alone could land that far past
    # the target, and methods whose next channel happens to be expensive would be compressed harder.
    slack = _plan_slack(cost, tol * ref, max_layer_ratio)
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
            # Every open group ran out above the target, and each closed group's next chunk lands below
            # the band: take and give back a few chunks per group to land in it.
            if not closed:
                _unreachable(cost.macs, target_macs, max_layer_ratio)
            steps = [_steps(sizes[h], removed[h], caps[h], round_to, _REACH) for h in range(len(groups))]
            choices = [c for c, _ in steps]
            gains = [[cost.macs - cost.remove(h, v - removed[h], commit=False) for v in c]
                     for h, c in enumerate(choices)]
            pick = _match_counts(cost, choices, gains, [m for _, m in steps], target_macs, slack, goal)
            if pick is None:
                _unreachable(cost.macs, target_macs, max_layer_ratio)
            counts, exact = pick
            for h, v in enumerate(counts):
                if v != removed[h]:
                    cost.remove(h, v - removed[h])
                    removed[h] = v
            cost.macs = exact  # the whole-plan figure (exact where groups share layers too)
            _warn_outside_band(exact, target_macs, tol * ref, ref, tol, round_to)
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
    dense_widths: Mapping[str, int] | None = None,
    reference_macs: float | None = None,
    tolerance: float | None = None,
) -> list[Tensor]:
    """The same fraction ``r`` of every group (``floor(r * size)`` channels, capped, see
    :func:`group_caps`), the largest ``r`` that does not yet meet ``target_macs``, plus one more channel
    (chunk) for a subset of the groups chosen so that the MACs land within the matched-budget band
    ``[target_macs - tolerance * reference_macs, target_macs]`` (see :func:`_fill_step`): every group
    stays within one channel of the common ratio. The channels are chosen by ``method.select`` (which
    may rewrite the kept weights) or else are the group's lowest scores."""
    sizes = np.asarray([g.size for g in groups])
    caps = np.asarray(group_caps(groups, max_layer_ratio, round_to, dense_widths), dtype=np.int64)
    ref = float(reference_macs) if reference_macs else cost.macs
    tol = budget_tolerance(cost, groups, ref, round_to, caps=caps.tolist()) if tolerance is None else float(tolerance)

    def counts(r: float) -> np.ndarray:
        n = np.floor(r * sizes + 1e-9).astype(np.int64)
        if round_to is not None and round_to > 1:
            rounded = sizes > round_to
            # keep a multiple of round_to (or everything: 12 channels keep 12 until 4 may go, as _chunk)
            keep = np.minimum(np.ceil((sizes - n) / round_to) * round_to, sizes)
            n = np.where(rounded, sizes - keep, n).astype(np.int64)
        return np.minimum(n, caps)

    n_remove = np.zeros(len(groups), dtype=np.int64)
    if groups and cost.macs > target_macs * (1 + 1e-12):
        if cost.macs_for(counts(1.0)) > target_macs * (1 + 1e-12):
            _unreachable(cost.macs_for(counts(1.0)), target_macs, max_layer_ratio)
        # Bisect over the ratios where some floor(r * size) steps (k / size), not over the reals:
        # every r then gives one consistent count per group.
        ratios = np.unique(np.concatenate([np.arange(n + 1) / n for n in set(sizes.tolist())]))
        lo, hi = 0, len(ratios) - 1  # counts(ratios[hi]) meets the target, counts(ratios[lo]) not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cost.macs_for(counts(ratios[mid])) <= target_macs * (1 + 1e-12) else (mid, hi)
        bases = [counts(ratios[j]) for j in range(lo, max(lo - _REACH, -1), -1)]  # the common ratio and a few below
        n_remove = _fill_step(cost, bases, counts(ratios[hi]), target_macs, sizes=sizes, caps=caps, round_to=round_to,
                              ref=ref, tol=tol, slack=_plan_slack(cost, tol * ref, max_layer_ratio))
    overrides = type(method).select is not PruningMethod.select
    plan = []
    for g, n in zip(groups, n_remove.tolist()):
        idx = _select(method, g, n, calib) if n and overrides else None
        if idx is None:
            idx = torch.argsort(score_groups(method, [g])[0], stable=True)[:n] if n else torch.empty(0, dtype=torch.long)
        plan.append(idx)
    return plan


def _fill_step(
    cost: MacsCostModel,
    bases: Sequence[np.ndarray],
    above: np.ndarray,
    target_macs: float,
    *,
    sizes: np.ndarray,
    caps: np.ndarray,
    round_to: int | None,
    ref: float,
    tol: float,
    slack: float,
) -> np.ndarray:
    """Between two adjacent ratios, give the extra channel to the subset of groups that lands the MACs
    in the band ``[target_macs - tol * ref, target_macs]`` (aiming at ``[target_macs - slack, target_macs]``,
    see :func:`_plan_slack`), instead of to all of them at once.

    Where groups of 16, 32 and 64 channels all step at 7/16 = 14/32 = 28/64, taking the whole step
    would overshoot a 40% target by several percent. ``bases[0]`` is the plan at the common ratio (the
    largest that misses the target) and ``above`` the one at the next ratio. The candidates are first
    the groups that step at the next ratio, then (if no subset of those fits) every group with room
    under its cap, then the same from the next lower ratios (``bases[1:]``: with few groups the subsets
    of one ratio may all miss the band); each group gets at most one chunk above its base, so every
    group stays within one channel of a common ratio. If no subset lands in the band: the one closest
    to the target that reaches it, and a warning.
    """
    goal = target_macs * (1 + 1e-12)
    pick = None
    for j, below in enumerate(bases):
        nxt = below + np.asarray([_chunk(int(n), int(r), round_to) for n, r in zip(sizes, below)], dtype=np.int64)
        stepping = np.flatnonzero(above > below) if j == 0 else np.zeros(0, dtype=np.int64)
        room = np.flatnonzero((nxt <= caps) & (below < sizes - 1))
        if cost.macs_for(np.where(np.isin(np.arange(len(below)), room), nxt, below)) > goal:
            break  # from this ratio down, even one more channel everywhere misses the target
        for cand in ((stepping,) if j == 0 else ()) + (np.union1d(stepping, room),):
            choices = [[int(b)] for b in below]
            for g in cand:
                choices[g].append(int(above[g] if j == 0 and above[g] > below[g] else nxt[g]))
            gains = _single_gains(cost, choices)
            got = _match_counts(cost, choices, gains, [list(range(len(c))) for c in choices], target_macs, slack, goal)
            if got is not None and (pick is None or got[1] > pick[1]):
                pick = got
            if pick is not None and pick[1] >= target_macs - slack:
                return np.asarray(pick[0], dtype=np.int64)
    if pick is None:  # cannot happen: `above` itself meets the target
        return above.copy()
    _warn_outside_band(pick[1], target_macs, tol * ref, ref, tol, round_to, uniform=True)
    return np.asarray(pick[0], dtype=np.int64)


def _single_gains(cost: MacsCostModel, choices: Sequence[Sequence[int]]) -> list[list[float]]:
    """MACs each option saves on its own (the other groups at option 0), from the whole-plan count."""
    base_counts = np.asarray([c[0] for c in choices], dtype=np.int64)
    base = cost.macs_for(base_counts)
    gains = []
    for g, c in enumerate(choices):
        row = [0.0]
        for v in c[1:]:
            one = base_counts.copy()
            one[g] = v
            row.append(base - cost.macs_for(one))
        gains.append(row)
    return gains


def _match_counts(
    cost: MacsCostModel,
    choices: Sequence[Sequence[int]],
    gains: Sequence[Sequence[float]],
    pens: Sequence[Sequence[float]],
    target_macs: float,
    slack: float,
    goal: float,
) -> tuple[list[int], float] | None:
    """One removed count per group out of ``choices`` (option 0: as it stands) so that the whole plan's
    MACs lie in ``[target_macs - slack, goal]``, with the fewest changes (``pens``).

    :func:`_match` works on the per-option ``gains`` (MACs saved, additive up to the layers that two
    groups share: a DenseNet conv reads many groups and is the root of another). Its answer is checked
    with the exact :meth:`MacsCostModel.macs_for`; if an interaction pushed it out of the band, the band
    is shifted by the error seen and searched again, and at last single options are changed one at a
    time on the exact figures. Returns (counts, exact MACs): in the band if found, else the closest plan
    that meets the target; ``None`` if none does.
    """

    def exact(sel: Sequence[int]) -> float:
        return cost.macs_for(np.asarray([choices[g][i] for g, i in enumerate(sel)], dtype=np.int64))

    def inside(m: float) -> bool:
        return target_macs - slack <= m <= goal

    base = exact([0] * len(choices))
    lo, hi = base - goal, base - target_macs + slack  # the gains that land in the band
    seen: list[tuple[list[int], float]] = []
    shift = 0.0
    for attempt in range(4):
        shrink = attempt * (hi - lo) / 8  # later attempts aim at the middle of the band
        sel = _match(gains, pens, lo + shift + shrink, max(hi + shift - shrink, lo + shift + shrink))
        if sel is None:
            break
        m = exact(sel)
        seen.append((sel, m))
        if inside(m):
            break
        shift = sum(gains[g][i] for g, i in enumerate(sel)) - (base - m)  # what the interactions took off
    if seen and not inside(seen[-1][1]):
        # exact local search from the attempt closest to the band: change one group's option at a time
        sel, m = min(seen, key=lambda s: abs(s[1] - (target_macs - slack / 2)))
        for _ in range(3):
            moves = [(exact(sel[:g] + [i] + sel[g + 1:]), g, i) for g in range(len(choices))
                     for i in range(len(choices[g])) if i != sel[g]]
            if not moves:
                break
            good = [mv for mv in moves if inside(mv[0])]
            m, g, i = (min(good, key=lambda mv: (pens[mv[1]][mv[2]] - pens[mv[1]][sel[mv[1]]], -mv[0])) if good
                       else min(moves, key=lambda mv: abs(mv[0] - (target_macs - slack / 2))))
            sel = sel[:g] + [i] + sel[g + 1:]
            seen.append((sel, m))
            if inside(m):
                break
    reaching = [s for s in seen if s[1] <= goal]
    if not reaching:
        return None
    in_band = [s for s in reaching if inside(s[1])]
    sel, m = in_band[-1] if in_band else max(reaching, key=lambda s: s[1])
    return [choices[g][i] for g, i in enumerate(sel)], m


def _match(gains: Sequence[Sequence[float]], pens: Sequence[Sequence[float]], lo: float, hi: float) -> list[int] | None:
    """Choose option ``i[g]`` of every group so that ``sum gains[g][i[g]]`` lies in ``[lo, hi]`` with the
    least total penalty (ties: the smallest sum); if no choice does, the smallest sum ``>= lo`` (ties:
    least penalty). ``None`` if no sum reaches ``lo``. Option 0 of every group is "no change".

    A dynamic programme over the sums on a grid of 1/64 of the band (the exact sums are carried along,
    so only choices that fall into the same cell compete): a few thousand cells for the sizes met here.
    """
    width = max(hi - lo, 0.0)
    span = sum(max(g) - min(g) for g in gains)
    q = max(width / 64, span / (1 << 17), 1e-9)
    shifts = [[int(round((v - min(g)) / q)) for v in g] for g in gains]
    size = sum(max(s) for s in shifts) + 1
    pen = np.full(size, np.inf)
    tot = np.zeros(size)
    pen[0] = 0.0
    top = 0  # highest cell reached so far
    back: list[np.ndarray] = []
    for gs, ps, ss in zip(gains, pens, shifts):
        new_pen = np.full(size, np.inf)
        new_tot = np.zeros(size)
        choice = np.full(size, -1, dtype=np.int8)
        for i, (gain, p, s) in enumerate(zip(gs, ps, ss)):
            cand = pen[: top + 1] + p
            dst = slice(s, s + top + 1)
            better = cand < new_pen[dst]
            new_pen[dst] = np.where(better, cand, new_pen[dst])
            new_tot[dst] = np.where(better, tot[: top + 1] + gain, new_tot[dst])
            choice[dst] = np.where(better, i, choice[dst])
        top += max(ss)
        pen, tot = new_pen, new_tot
        back.append(choice)
    ok = np.isfinite(pen)
    inside = np.flatnonzero(ok & (tot >= lo) & (tot <= hi))
    if inside.size:
        idx = int(inside[np.lexsort((tot[inside], pen[inside]))[0]])
    else:
        reach = np.flatnonzero(ok & (tot >= lo))
        if not reach.size:
            return None
        idx = int(reach[np.lexsort((pen[reach], tot[reach]))[0]])
    sel = [0] * len(gains)
    for g in range(len(gains) - 1, -1, -1):
        sel[g] = int(back[g][idx])
        idx -= shifts[g][sel[g]]
    return sel


def _plan_slack(cost: MacsCostModel, slack: float, max_layer_ratio: float) -> float:
    """How far below the target a plan may land: the band less a margin for the MACs the cost model
    does not follow (:attr:`MacsCostModel.unmodelled`, of which at most ``max_layer_ratio`` can go)."""
    margin = max(_MARGIN * slack, min(max_layer_ratio, 1.0) * cost.unmodelled)
    return slack - min(margin, slack / 2)


def _warn_outside_band(macs: float, target_macs: float, slack: float, ref: float, tol: float, round_to: int | None,
                       uniform: bool = False) -> None:
    """The one warning of a plan that could not land within the matched-budget band."""
    if macs >= target_macs - slack:
        return
    why = ("one ratio for every group (within one channel) leaves" if uniform
           else "the channel costs and the layer caps leave")
    if round_to is not None and round_to > 1:
        why = why.replace(" leave", f" with round_to={round_to} leave")
    logger.warning(
        "MACs target %.2f%% reached as %.3f%% (%.3f pp past it, tolerance %.3f pp): %s no closer plan",
        100 * (1 - target_macs / ref), 100 * (1 - macs / ref), 100 * (target_macs - macs) / ref, 100 * tol, why,
    )


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
            with contextlib.nullcontext() if stale else index_mapping_refresh_skipped():
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
    dense_widths: Mapping[str, int] | None = None,
) -> PruneResult:
    """Prune ``model`` in place until its MACs are ``(1 - target) * reference_macs``.

    ``reference_macs`` defaults to the model's current MACs; pass the dense model's figure for the
    later steps of iterative pruning so every step's target stays relative to dense (a step whose
    target is already met removes nothing). ``method.attach(model, groups)`` is called with the fresh
    groups before scoring, and again after the cut with the groups of the pruned model, so the
    method's regularizer can go on training it (iterative pruning).

    The achieved reduction lands in ``[target, target + tolerance]`` (``PruneResult.tolerance``, see
    :func:`budget_tolerance`: 0.1 percentage point, or half the cheapest channel's share on small
    models), the same band for every method; where ``round_to`` or the caps rule that out, the closest
    reduction above the target and one warning. ``max_layer_ratio`` is a fraction of each group's dense
    width when ``dense_widths`` (group name -> width before the first step) is given, so later steps of
    iterative pruning do not compound it (see :func:`group_caps`).
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
    caps = group_caps(groups, max_layer_ratio, round_to, dense_widths)
    tol = budget_tolerance(cost, groups, ref, round_to, caps=caps)
    budget = dict(max_layer_ratio=max_layer_ratio, round_to=round_to, dense_widths=dense_widths,
                  reference_macs=ref, tolerance=tol)
    if method.uniform:
        plan = plan_uniform(groups, method, cost, target_macs, calib=calib, **budget)
    else:
        scores = score_groups(method, groups)
        plan = plan_global(groups, scores, cost, target_macs, **budget)
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
        tolerance=tol,
    )
