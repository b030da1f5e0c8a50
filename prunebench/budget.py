"""The MACs budget of a plan: what removing channels costs and saves, and the matched-budget band.

* :class:`MacsCostModel` -- MACs of the model for any per-group channel counts, from one fvcore pass
  (exact for conv/linear/norm layers, whose cost is linear in their in- and out-channels; adaptive
  pooling and functional ops are left out, so plans keep a margin for them inside the band);
* caps and chunks -- ``max_layer_ratio`` of each group's dense width, ``round_to`` multiples;
* scope ``auto`` of one step (:func:`resolve_auto_scope`) -- ``internal`` where its capped groups reach
  the target;
* the band -- every method lands in ``[target, target + tol]`` (:func:`budget_tolerance`), and
  :func:`match_counts` picks per-group counts that fall in it where a plan overshot.

The long story, with the reasons for each rule, is in docs/fairness.md ("Matched budgets").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from prunebench.depgraph import NORM_TYPES, is_depthwise
from prunebench.errors import UserError
from prunebench.groups import PrunableGroup, Scope
from prunebench.measure import MacsReport

CONV_FC = (nn.modules.conv._ConvNd, nn.Linear)
_MIN_TOLERANCE = 0.001  # the matched-budget band is at least 0.1 percentage point of the reference MACs
# Plans aim at the band less a margin (this share of it at least, at most half of it): adaptive pooling is
# outside the cost model, and where it follows a pruned group the real count comes out a little lower
# than planned (MobileNetV2's global pool: up to ~0.015 pp).
_MARGIN = 0.05
REACH = 4  # chunks per group a global plan may take or give back to land in the band once its ranking ran out


logger = logging.getLogger(__name__)


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
        # pruned conv), so plans keep a margin for it (see plan_slack).
        fixed = sum(
            report.by_module.get(n, 0)
            for n, m in model.named_modules()
            if m not in index and isinstance(m, CONV_FC + NORM_TYPES)
        )
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
        k = chunk(grp.size, 0, round_to)
        if grp.size > 1 and (caps is None or caps[g] >= k):
            cheapest = min(cheapest, cost.macs - cost.remove(g, k, commit=False))
    if not math.isfinite(cheapest) or reference_macs <= 0:
        return _MIN_TOLERANCE
    return max(_MIN_TOLERANCE, 0.5 * cheapest / float(reference_macs))


VECTOR_WIDTHS = {"AVX512": 16, "AVX2": 8, "SVE256": 8}
"""float32 lanes of a CPU's vector registers, by ``torch.backends.cpu.get_cpu_capability()`` (others: 4)."""
CUDA_ROUND_TO = 8  # bf16 tensor-core tiles: channel counts in multiples of 8


def device_round_to(device: torch.device | str) -> int:
    """The channel multiple that ``prune.round_to: auto`` means on ``device``: the vector width of the CPU in
    float32 (16 with AVX-512, 8 with AVX2 and 256-bit SVE, 4 otherwise), 8 on CUDA. oneDNN and cuDNN pad odd channel counts
    up to it, so a width in between costs nearly as much as the next multiple (docs/fairness.md, speed)."""
    device = torch.device(device)
    if device.type == "cuda":
        return CUDA_ROUND_TO
    return VECTOR_WIDTHS.get(torch.backends.cpu.get_cpu_capability(), 4)


def describe_device(device: torch.device | str) -> str:
    """The device in the words of :func:`device_round_to`: ``CUDA`` or the CPU's vector capability."""
    device = torch.device(device)
    return "CUDA" if device.type == "cuda" else f"this {torch.backends.cpu.get_cpu_capability()} CPU"


def resolve_round_to(value: int | str | None, device: torch.device | str) -> int | None:
    """The recipe's ``prune.round_to`` as the engine takes it: ``auto`` -> :func:`device_round_to`, 1 or
    ``None`` -> ``None`` (the widths as pruned, the papers' exact widths)."""
    if value == "auto":
        return device_round_to(device)
    if value is None or int(value) <= 1:
        return None
    return int(value)


def _rounds(size: int, round_to: int | None) -> bool:
    return round_to is not None and round_to > 1 and size > round_to


def chunk(size: int, removed: int, round_to: int | None) -> int:
    """How many channels the next removal from a group takes: one, or (with ``round_to``) down to the
    next multiple of ``round_to``."""
    if not _rounds(size, round_to):
        return 1
    assert round_to is not None
    remaining = size - removed
    return remaining - ((remaining - 1) // round_to) * round_to


def _unchunk(size: int, removed: int, round_to: int | None) -> int:
    """How many channels giving back the last removal of a group restores (the inverse of :func:`chunk`)."""
    if not _rounds(size, round_to):
        return 1
    assert round_to is not None
    back = (size - removed) // round_to * round_to + round_to
    return removed if back >= size else removed - (size - back)


def count_steps(size: int, removed: int, cap: int, round_to: int | None, reach: int) -> tuple[list[int], list[int]]:
    """Removed counts of a group within ``reach`` chunks of ``removed`` (down to 0, up to ``cap``), and
    how many chunks each is away: ``[removed, +1 chunk, -1 chunk, +2, -2, ...]``, ``[0, 1, 1, 2, 2, ...]``."""
    up, down = [removed], [removed]
    for _ in range(reach):
        if up[-1] < size - 1 and up[-1] + chunk(size, up[-1], round_to) <= cap:
            up.append(up[-1] + chunk(size, up[-1], round_to))
        if down[-1] > 0:
            down.append(down[-1] - _unchunk(size, down[-1], round_to))
    counts, moves = [removed], [0]
    for i in range(1, reach + 1):
        for v in (up, down):
            if i < len(v):
                counts.append(v[i])
                moves.append(i)
    return counts, moves


def single_gains(cost: MacsCostModel, choices: Sequence[Sequence[int]]) -> list[list[float]]:
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


def match_counts(
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
            moves = [
                (exact(sel[:g] + [i] + sel[g + 1 :]), g, i)
                for g in range(len(choices))
                for i in range(len(choices[g]))
                if i != sel[g]
            ]
            if not moves:
                break
            good = [mv for mv in moves if inside(mv[0])]
            m, g, i = (
                min(good, key=lambda mv: (pens[mv[1]][mv[2]] - pens[mv[1]][sel[mv[1]]], -mv[0]))
                if good
                else min(moves, key=lambda mv: abs(mv[0] - (target_macs - slack / 2)))
            )
            sel = sel[:g] + [i] + sel[g + 1 :]
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


def capped_macs(
    model: nn.Module,
    groups: Sequence[PrunableGroup],
    report: MacsReport,
    max_layer_ratio: float,
    round_to: int | None = None,
    dense_widths: Mapping[str, int] | None = None,
) -> float:
    """The cost model's MACs with every one of ``groups`` cut to its cap: the floor a plan can reach."""
    caps = np.asarray(group_caps(groups, max_layer_ratio, round_to, dense_widths), dtype=np.int64)
    return MacsCostModel(model, groups, report).macs_for(caps)


def resolve_auto_scope(
    model: nn.Module,
    groups: Sequence[PrunableGroup],
    report: MacsReport,
    target_macs: float,
    max_layer_ratio: float,
    round_to: int | None = None,
    dense_widths: Mapping[str, int] | None = None,
) -> tuple[Scope, list[PrunableGroup]]:
    """Scope ``auto`` for one pruning step: ``internal`` when its groups, every one cut to its cap, reach
    ``target_macs``, and ``all`` otherwise (``groups`` are the groups of scope ``all``)."""
    internal = [g for g in groups if not g.coupled]
    if internal:
        floor = capped_macs(model, internal, report, max_layer_ratio, round_to, dense_widths)
        if floor <= target_macs * (1 + 1e-12):
            logger.info("scope auto: internal (its %d groups reach the target)", len(internal))
            return "internal", internal
        why = f"internal reaches only {1 - floor / report.macs:.3f} of the current MACs"
    else:
        why = "no internal group"
    logger.info("scope auto: all (%s)", why)
    return "all", list(groups)


def plan_slack(cost: MacsCostModel, slack: float, max_layer_ratio: float) -> float:
    """How far below the target a plan may land: the band less a margin for the MACs the cost model
    does not follow (:attr:`MacsCostModel.unmodelled`, of which at most ``max_layer_ratio`` can go)."""
    margin = max(_MARGIN * slack, min(max_layer_ratio, 1.0) * cost.unmodelled)
    return slack - min(margin, slack / 2)


def warn_outside_band(
    macs: float, target_macs: float, slack: float, ref: float, tol: float, round_to: int | None, uniform: bool = False
) -> None:
    """The one warning of a plan that could not land within the matched-budget band."""
    if macs >= target_macs - slack:
        return
    why = (
        "one ratio for every group (within one channel) leaves"
        if uniform
        else "the channel costs and the layer caps leave"
    )
    if round_to is not None and round_to > 1:
        why = why.replace(" leave", f" with round_to={round_to} leave")
    logger.warning(
        "MACs target %.2f%% reached as %.3f%% (%.3f pp past it, tolerance %.3f pp): %s no closer plan",
        100 * (1 - target_macs / ref),
        100 * (1 - macs / ref),
        100 * (target_macs - macs) / ref,
        100 * tol,
        why,
    )


def unreachable(best_macs: float, target_macs: float, max_layer_ratio: float) -> None:
    raise UserError(
        f"cannot reach the MACs target ({target_macs / 1e6:.2f} M MACs): the prunable groups, capped at "
        f"max_layer_ratio={max_layer_ratio}, only get down to {best_macs / 1e6:.2f} M; raise "
        "prune.max_layer_ratio, use prune.scope 'all', or lower the target"
    )
