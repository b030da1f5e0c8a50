"""The targets of ``prunebench bench`` and the pass/fail check of every figure against them.

Every timing budget of the project lives here and nowhere else: the test suite asserts what the code
computes, never how long it takes (a wall-clock assert fails on a loaded machine and says nothing on a fast
one); ``prunebench bench`` measures the times on the reference workload and reports each against its
bound. See docs/architecture.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

TARGET_METHODS = ("oicsr", "group_lasso", "slimming")
"""Methods whose regularization overhead has a target (the ones with per-step hooks)."""


@dataclass(frozen=True)
class Target:
    """A bound on one figure: ``value >= bound`` (``at_least``) or ``value <= bound``."""

    figure: str
    bound: float
    at_least: bool
    why: str

    def met(self, value: float) -> bool:
        return math.isfinite(value) and (value >= self.bound if self.at_least else value <= self.bound)

    @property
    def text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound:g}"


TARGETS: dict[str, Target] = {
    "loop_efficiency": Target("loop_efficiency", 0.95, True, "the loop costs at most 5% over a bare loop"),
    "reg_overhead": Target("reg_overhead", 1.05, False, "a regularizer costs at most 5% of a step"),
    "data_headroom": Target("data_headroom", 10.0, True, "augmentation never starves the step"),
    "speedup_efficiency": Target(
        "speedup_efficiency", 0.8, True, "fewer MACs are real speed, with the default plan (prune.round_to: auto)"
    ),
    "engine_s": Target("engine_s", 3.0, False, "pruning is cheap next to training"),
    "thinet_s": Target("thinet_s", 20.0, False, "calibration-based selection is cheap"),
    "macs_count_s": Target("macs_count_s", 1.0, False, "counting is cheap"),
}
"""One bound per figure. ``engine_s`` bounds a whole ``prune_to_target`` call (groups, scores, plan, cut and
both MACs counts), ``thinet_s`` ThiNet's selection and reconstruction (the engine's plan step) and
``macs_count_s`` one fvcore count, each on the bench model (resnet56_cifar unless ``--model`` says otherwise).
``speedup_efficiency`` bounds the main plan (``--round-to``, ``auto`` by default); the widths as pruned
(``speedup_efficiency_exact``), ONNX Runtime's and torch.compile's figures are informational, without a target."""


Check = TypedDict(
    "Check", {"name": str, "figure": str, "key": "str | None", "value": float, "target": str, "pass": bool}
)
"""One figure (or one method's entry of a per-method figure) against its target."""


def check_targets(figures: dict[str, Any], device: torch.device) -> list[Check]:
    """One row per target: figure, key (method), value, bound, pass."""
    rows: list[Check] = []

    def add(figure: str, value: float, key: str | None = None) -> None:
        t = TARGETS[figure]
        label = f"{figure}[{key}]" if key else figure
        rows.append(
            {"name": label, "figure": figure, "key": key, "value": value, "target": t.text, "pass": t.met(value)}
        )

    add("loop_efficiency", figures["loop_efficiency"])
    for m in TARGET_METHODS:
        add("reg_overhead", figures["reg_overhead"][m], m)
    if device.type == "cpu":  # the headroom target is a CPU one (a GPU step is far faster)
        add("data_headroom", figures["data_headroom"])
    for k, v in figures["speedup_efficiency"].items():
        add("speedup_efficiency", v, k)
    for f in ("engine_s", "thinet_s", "macs_count_s"):
        add(f, figures[f])
    return rows
