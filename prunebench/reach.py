"""How far pruning can take a model, per scope, before anything trains -- and what ``scope: auto`` means.

The engine refuses a target its capped groups cannot reach (:func:`prunebench.budget.unreachable`), but it
finds out only at the pruning step, after the dense model and the sparsity stage have trained. This module
asks the same question up front, on a freshly built model and the example input:

* :func:`measure_reach` -- for each scope (``internal``, ``all``), the largest MACs reduction the prunable
  groups reach with every group cut to its cap (``max_layer_ratio`` of its dense width, ``round_to``
  multiples, never its last channel): the cost model's MACs at the capped counts, exactly the figure the
  engine's own unreachable check compares with the target. The weights do not matter, only the shapes.
* :func:`resolve_scope` -- the scope the cells use: an explicit one as written, ``auto`` -> ``internal``
  when it reaches the recipe's largest target and ``all`` otherwise; a target no allowed scope reaches is
  a :class:`UserError` naming the target, the reachable figure per scope and the fixes.

docs/methods.md ("Prunable groups", "Pruning engine") has the rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from prunebench.budget import capped_macs, resolve_round_to
from prunebench.errors import UserError
from prunebench.groups import PrunableGroup, build_groups
from prunebench.measure import MacsReport, count_macs

SCOPES = ("internal", "all")
_EPS = 1e-12  # the engine's own slack when it compares MACs with a target (plan_global, plan_uniform)


@dataclass(frozen=True)
class ScopeReach:
    """One scope: how many prunable groups it has and the largest MACs reduction they reach together."""

    scope: str
    groups: int
    reduction: float  # 1 - MACs with every group at its cap / dense MACs (0 without groups)


@dataclass(frozen=True)
class Reach:
    """The largest MACs reduction of each scope under one cap (``max_layer_ratio``, ``round_to``)."""

    dense_macs: float
    scopes: dict[str, ScopeReach]
    max_layer_ratio: float
    round_to: int | None = None

    def reaches(self, scope: str, target: float) -> bool:
        """Whether ``scope`` can meet ``target`` (a MACs reduction), as the engine would judge it."""
        floor = self.dense_macs * (1.0 - self.scopes[scope].reduction)
        return floor <= self.dense_macs * (1.0 - target) * (1.0 + _EPS)

    def describe(self) -> str:
        """``internal 0.712 (9 groups), all 0.853 (12 groups)``: the figures a message quotes."""
        return ", ".join(f"{s.scope} {s.reduction:.3f} ({s.groups} groups)" for s in self.scopes.values())


def measure_reach(
    model: nn.Module,
    example_input: Tensor,
    *,
    max_layer_ratio: float = 0.8,
    round_to: int | str | None = None,
    ignored_layers: Iterable[str] = (),
) -> Reach:
    """The largest MACs reduction each scope reaches on ``model`` (see the module docstring).

    The groups are traced once, in scope ``all``; ``internal`` is the part of them not tied to a merge (the
    groups ``build_groups(scope="internal")`` returns). Raises :class:`UserError` where ``build_groups`` does
    (an unknown ignored layer, a model with nothing to prune in any scope).
    """
    round_to = resolve_round_to(round_to, example_input.device)
    report = count_macs(model, example_input)
    _, groups = build_groups(model, example_input, scope="all", ignored_layers=ignored_layers)
    by_scope = {"internal": [g for g in groups if not g.coupled], "all": groups}
    return Reach(
        dense_macs=float(report.macs),
        scopes={
            s: ScopeReach(s, len(by_scope[s]), _reduction(model, by_scope[s], report, max_layer_ratio, round_to))
            for s in SCOPES
        },
        max_layer_ratio=max_layer_ratio,
        round_to=round_to,
    )


def _reduction(
    model: nn.Module,
    groups: Sequence[PrunableGroup],
    report: MacsReport,
    max_layer_ratio: float,
    round_to: int | None,
) -> float:
    """1 - (the cost model's MACs with every group at its cap) / dense MACs."""
    if not groups or report.macs <= 0:
        return 0.0
    return 1.0 - capped_macs(model, groups, report, max_layer_ratio, round_to) / float(report.macs)


def resolve_scope(reach: Reach, scope: str, targets: Sequence[float], *, model: str = "the model") -> tuple[str, str]:
    """The scope the cells use and why: ``(scope, reason)``.

    An explicit scope is kept; ``auto`` is ``internal`` when it reaches the largest of ``targets`` and
    ``all`` otherwise. A target the chosen scope cannot reach (for ``auto``: neither scope) is a one-line
    :class:`UserError` with the reachable figure of every scope and the fixes.
    """
    target = max(targets)
    if scope == "auto":
        if reach.reaches("internal", target):
            chosen = "internal"
            why = f"it reaches the largest target {target:g} (up to {reach.scopes['internal'].reduction:.3f})"
        elif reach.reaches("all", target):
            chosen = "all"
            why = (
                f"internal reaches only {reach.scopes['internal'].reduction:.3f}, short of the largest target "
                f"{target:g}; all reaches {reach.scopes['all'].reduction:.3f}"
            )
        else:
            raise UserError(_unreachable(reach, scope, target, model))
        return chosen, why
    if scope not in SCOPES:
        raise UserError(f"unknown pruning scope {scope!r}; use one of auto, {', '.join(SCOPES)}")
    if not reach.reaches(scope, target):
        raise UserError(_unreachable(reach, scope, target, model))
    return scope, f"as written (reaches up to {reach.scopes[scope].reduction:.3f})"


def _unreachable(reach: Reach, scope: str, target: float, model: str) -> str:
    best = max(s.reduction for s in reach.scopes.values()) if scope == "auto" else reach.scopes[scope].reduction
    fixes = []
    if best > 0 and reach.max_layer_ratio < 1:
        fixes.append(f"raise prune.max_layer_ratio (now {reach.max_layer_ratio:g})")
    if best > 0 and reach.round_to is not None and reach.round_to > 1:
        fixes.append(f"lower prune.round_to (now {reach.round_to})")
    if scope == "internal" and reach.reaches("all", target):
        fixes.append("use prune.scope all (or auto)")
    if best > 0:
        fixes.append(f"lower the target to at most {math.floor(best * 1000) / 1000:.3f}")
    if not fixes:
        fixes.append("remove some prune.ignored_layers or pick a model with prunable channels")
    return (
        f"MACs target {target:g} cannot be reached on {model} with prune.scope {scope}: with every prunable "
        f"group cut to its cap the MACs reduction reaches at most {reach.describe()}; " + ", or ".join(fixes)
    )
