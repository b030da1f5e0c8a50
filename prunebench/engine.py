"""The shared pruning engine: plan which channels go to meet a MACs target, then cut them for real.

Every method goes through this one engine, so methods differ only in how they rank channels (docs/methods.md
"Pruning engine"):

* **global greedy** (:func:`plan_global`): every channel of every group gets the method's score
  (normalized within its group when the method says so); channels are removed lowest first until the
  MACs reduction reaches the target, never taking more than ``max_layer_ratio`` of a group, nor its
  last channel;
* **uniform** (:func:`plan_uniform`, calibrated methods -- those that define ``select`` -- such as ThiNet): one fraction of
  every group, found by bisection, and the method's ``select`` picks the channels from calibration
  data.

**Matched budgets and caps** (:mod:`prunebench.budget`): every method's achieved reduction lies in the
same band ``[target, target + tol]``, no group loses more than ``max_layer_ratio`` of its dense width, and
MACs come from a cost model checked against a real fvcore count of the cut model (docs/fairness.md).

The cut itself is torch-pruning's: each group is asked for again from the dependency graph with the
chosen indices and pruned (as torch-pruning's ``MetaPruner`` does). Groups are disjoint, so cutting one
does not move the indices of another.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunebench.budget import (
    CONV_FC,
    REACH,
    MacsCostModel,
    budget_tolerance,
    chunk,
    count_steps,
    group_caps,
    match_counts,
    plan_slack,
    resolve_auto_scope,
    resolve_round_to,
    single_gains,
    unreachable,
    warn_outside_band,
)
from prunebench.depgraph import refresh_split_offsets, sync_split_sizes, tolerant_concat_mapping
from prunebench.errors import UserError, quiet_loggers
from prunebench.groups import PrunableGroup, Scope, build_groups, index_mapping_refresh_skipped
from prunebench.measure import count_macs
from prunebench.method import Calibration, PruningMethod

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
    slack = plan_slack(cost, tol * ref, max_layer_ratio)
    closed: set[int] = set()
    if cost.macs > goal:
        for g, r in zip(gids[glob].tolist(), ranks[glob].tolist()):
            if g in closed or r < removed[g]:
                continue  # closed, or taken already with an earlier chunk
            k = chunk(sizes[g], removed[g], round_to)
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
                unreachable(cost.macs, target_macs, max_layer_ratio)
            steps = [count_steps(sizes[h], removed[h], caps[h], round_to, REACH) for h in range(len(groups))]
            choices = [c for c, _ in steps]
            gains = [
                [cost.macs - cost.remove(h, v - removed[h], commit=False) for v in c] for h, c in enumerate(choices)
            ]
            pick = match_counts(cost, choices, gains, [m for _, m in steps], target_macs, slack, goal)
            if pick is None:
                unreachable(cost.macs, target_macs, max_layer_ratio)
            counts, exact = pick
            for h, v in enumerate(counts):
                if v != removed[h]:
                    cost.remove(h, v - removed[h])
                    removed[h] = v
            cost.macs = exact  # the whole-plan figure (exact where groups share layers too)
            warn_outside_band(exact, target_macs, tol * ref, ref, tol, round_to)
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
            # keep a multiple of round_to (or everything: 12 channels keep 12 until 4 may go, as chunk)
            keep = np.minimum(np.ceil((sizes - n) / round_to) * round_to, sizes)
            n = np.where(rounded, sizes - keep, n).astype(np.int64)
        return np.minimum(n, caps)

    n_remove = np.zeros(len(groups), dtype=np.int64)
    if groups and cost.macs > target_macs * (1 + 1e-12):
        if cost.macs_for(counts(1.0)) > target_macs * (1 + 1e-12):
            unreachable(cost.macs_for(counts(1.0)), target_macs, max_layer_ratio)
        # Bisect over the ratios where some floor(r * size) steps (k / size), not over the reals:
        # every r then gives one consistent count per group.
        ratios = np.unique(np.concatenate([np.arange(n + 1) / n for n in set(sizes.tolist())]))
        lo, hi = 0, len(ratios) - 1  # counts(ratios[hi]) meets the target, counts(ratios[lo]) not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cost.macs_for(counts(ratios[mid])) <= target_macs * (1 + 1e-12) else (mid, hi)
        bases = [counts(ratios[j]) for j in range(lo, max(lo - REACH, -1), -1)]  # the common ratio and a few below
        n_remove = _fill_step(
            cost,
            bases,
            counts(ratios[hi]),
            target_macs,
            sizes=sizes,
            caps=caps,
            round_to=round_to,
            ref=ref,
            tol=tol,
            slack=plan_slack(cost, tol * ref, max_layer_ratio),
        )
    overrides = type(method).select is not PruningMethod.select
    plan = []
    for g, n in zip(groups, n_remove.tolist()):
        idx = _select(method, g, n, calib) if n and overrides else None
        if idx is None:
            idx = (
                torch.argsort(score_groups(method, [g])[0], stable=True)[:n] if n else torch.empty(0, dtype=torch.long)
            )
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
    see :func:`plan_slack`), instead of to all of them at once.

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
        nxt = below + np.asarray([chunk(int(n), int(r), round_to) for n, r in zip(sizes, below)], dtype=np.int64)
        stepping = np.flatnonzero(above > below) if j == 0 else np.zeros(0, dtype=np.int64)
        room = np.flatnonzero((nxt <= caps) & (below < sizes - 1))
        if cost.macs_for(np.where(np.isin(np.arange(len(below)), room), nxt, below)) > goal:
            break  # from this ratio down, even one more channel everywhere misses the target
        for cand in ((stepping,) if j == 0 else ()) + (np.union1d(stepping, room),):
            choices = [[int(b)] for b in below]
            for g in cand:
                choices[g].append(int(above[g] if j == 0 and above[g] > below[g] else nxt[g]))
            gains = single_gains(cost, choices)
            got = match_counts(cost, choices, gains, [list(range(len(c))) for c in choices], target_macs, slack, goal)
            if got is not None and (pick is None or got[1] > pick[1]):
                pick = got
            if pick is not None and pick[1] >= target_macs - slack:
                return np.asarray(pick[0], dtype=np.int64)
    if pick is None:  # cannot happen: `above` itself meets the target
        return above.copy()
    warn_outside_band(pick[1], target_macs, tol * ref, ref, tol, round_to, uniform=True)
    return np.asarray(pick[0], dtype=np.int64)


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


# -- cutting ---------------------------------------------------------------------------------------


def cut(graph: Any, groups: Sequence[PrunableGroup], plan: Sequence[Tensor]) -> None:
    """Remove the planned channels for real, group by group, through the dependency graph.

    The plan's group channels become the root layer's channels (a grouped conv's unit is one channel in
    each of its blocks); the sub-groups of one root (:mod:`prunebench.groups`, "partial members") are cut
    in one call, since cutting one would move the indices of the next. torch-pruning refreshes every
    concat/split index mapping before it hands out a group (seconds on DenseNet-121). Only cutting a
    coupled group can move those offsets (an internal group passes through no concat or split), so the
    refresh runs only after such a cut.
    """
    cuts: dict[tuple[int, str], tuple[PrunableGroup, list[int]]] = {}
    for g, idx in zip(groups, plan):
        if idx.numel():
            key = (id(g.root), getattr(g.tp_fn, "__name__", repr(g.tp_fn)))
            cuts.setdefault(key, (g, []))[1].extend(g.root_channels(idx))
    stale = False
    for g, channels in cuts.values():
        with tolerant_concat_mapping([]) if stale else index_mapping_refresh_skipped():
            graph.get_pruning_group(g.root, g.tp_fn, sorted(set(channels))).prune()
        stale = g.coupled or g.extra.get("remaps", False)
        if stale:
            refresh_split_offsets(graph)
    sync_split_sizes(graph.model)


def _removed_per_layer(groups: Sequence[PrunableGroup], plan: Sequence[Tensor]) -> dict[str, int]:
    """Out-channels each root layer lost (a layer's sub-groups together; a grouped conv's unit counts
    each of its channels)."""
    names = {g.root: g.name.split("[")[0] for g in groups}
    removed = dict.fromkeys(names.values(), 0)
    for g, idx in zip(groups, plan):
        removed[names[g.root]] += len(g.root_channels(idx)) if idx.numel() else 0
    return removed


def _layer_dims(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    return {
        n: (
            type(m).__name__,
            *((m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)),
        )
        for n, m in model.named_modules()
        if isinstance(m, CONV_FC)
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


def _plan(
    groups: Sequence[PrunableGroup],
    method: PruningMethod,
    cost: MacsCostModel,
    target_macs: float,
    scores: Any,
    calib: Calibration | None,
    max_layer_ratio: float,
    round_to: int | None,
    dense_widths: Mapping[str, int] | None,
    ref: float,
) -> tuple[list[Tensor], float]:
    """The cut plan (uniform for a calibrated method, else global by score) and its band's tolerance."""
    caps = group_caps(groups, max_layer_ratio, round_to, dense_widths)
    tol = budget_tolerance(cost, groups, ref, round_to, caps=caps)
    budget = dict(
        max_layer_ratio=max_layer_ratio, round_to=round_to, dense_widths=dense_widths, reference_macs=ref, tolerance=tol
    )
    if method.calibrated:
        return plan_uniform(groups, method, cost, target_macs, calib=calib, **budget), tol
    return plan_global(groups, scores, cost, target_macs, **budget), tol


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
    round_to: int | str | None = None,
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
    reduction above the target and one warning (``round_to="auto"``: :func:`prunebench.budget.device_round_to`
    of the input's device). ``max_layer_ratio`` is a fraction of each group's dense
    width when ``dense_widths`` (group name -> width before the first step) is given, so later steps of
    iterative pruning do not compound it (see :func:`group_caps`).
    """
    if not 0.0 <= target < 1.0:
        raise UserError(f"pruning target must be a MACs reduction in [0, 1), got {target}")
    if not 0.0 < max_layer_ratio <= 1.0:
        raise UserError(f"prune.max_layer_ratio must be in (0, 1], got {max_layer_ratio}")
    round_to = resolve_round_to(round_to, example_input.device)  # "auto": the device's vector width
    timings: dict[str, float] = {}
    t_start = t = time.perf_counter()
    before = count_macs(model, example_input)
    timings["count"] = time.perf_counter() - t
    ref = float(reference_macs) if reference_macs else float(before.macs)

    t = time.perf_counter()
    target_macs = ref * (1.0 - target)
    graph, groups = build_groups(
        model, example_input, scope="all" if scope == "auto" else scope, ignored_layers=ignored_layers
    )
    if scope == "auto":
        scope, groups = resolve_auto_scope(model, groups, before, target_macs, max_layer_ratio, round_to, dense_widths)
    cost = MacsCostModel(model, groups, before)
    method.attach(model, groups)
    timings["groups"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = None if method.calibrated else score_groups(method, groups)
    rounded = round_to is not None and round_to > 1
    args = (groups, method, cost, target_macs, scores, calib, max_layer_ratio)
    with quiet_loggers("prunebench.budget") if rounded else contextlib.nullcontext():
        plan, tol = _plan(*args, round_to, dense_widths, ref)
    if rounded and cost.macs_for(np.asarray([len(p) for p in plan])) < target_macs - tol * ref:
        msg = "round_to=%s leaves no plan within %.3f pp of the %.1f%% MACs target: this cut keeps exact widths"
        logger.warning(msg, round_to, 100 * tol, 100 * target)  # the budget match comes first (docs/fairness.md)
        cost = MacsCostModel(model, groups, before)  # the global plan spent the first one's removals
        plan, tol = _plan(groups, method, cost, *args[3:], None, dense_widths, ref)
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
        removed=_removed_per_layer(groups, plan),
        layers=_layer_table(dims_before, _layer_dims(model)),
        seconds=time.perf_counter() - t_start,
        reference_macs=int(ref),
        timings=timings,
        tolerance=tol,
    )
