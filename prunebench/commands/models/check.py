"""One model of ``prunebench models --check``: build it, count its prunable groups, measure how far each scope
reaches, and let every method cut a fresh copy to every target. Every failure is caught and kept as one line
of words (:attr:`ModelCheck.error`, :attr:`Cut.error`): the check of a model never stops the report."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from prunebench.commands.models.config import ZooConfig
from prunebench.engine import prune_to_target
from prunebench.errors import UserError, one_line
from prunebench.groups import build_groups
from prunebench.method import Calibration, PruningMethod
from prunebench.models import create_model
from prunebench.reach import SCOPES, measure_reach, resolve_scope
from prunebench.recipe import ModelConfig

log = logging.getLogger(__name__)

ON_TARGET = 0.01
"""A cut counts as done when its achieved MACs reduction is within this of the target (the issue's bar)."""


@dataclass
class Cut:
    """One method at one target: the scope ``auto`` resolved to, the achieved MACs reduction (a real fvcore
    count of the cut model) and, when it did not cut, why."""

    method: str
    target: float
    scope: str | None = None
    reduction: float | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.reduction is not None and abs(self.reduction - self.target) <= ON_TARGET


@dataclass
class ModelCheck:
    """What the check found for one model; ``error`` (with the ``stage`` it happened in) when it could not be
    built or traced, in which case the later figures are missing."""

    model: str
    params: int | None = None
    macs: float | None = None
    groups: dict[str, int] = field(default_factory=dict)
    reach: dict[str, float] = field(default_factory=dict)
    groups_seconds: float | None = None
    cuts: list[Cut] = field(default_factory=list)
    seconds: float = 0.0
    stage: str | None = None
    error: str | None = None
    warnings: dict[str, int] = field(default_factory=dict)  # what prunebench warned while checking it: times seen


def reason(exc: BaseException) -> str:
    """An exception as one line of words: a :class:`UserError`'s message as it is, anything else with its type."""
    if isinstance(exc, UserError):
        return one_line(exc, 400)
    return f"{type(exc).__name__}: {one_line(exc, 300)}"


def check_model(name: str, cfg: ZooConfig, methods: dict[str, type[PruningMethod]]) -> ModelCheck:
    """Check ``name`` (see the module docstring); never raises for a failure of the model or a method. The
    warnings prunebench logs meanwhile (groups left whole, a plan outside the band) are kept with it."""
    result = ModelCheck(name)
    with _warnings_into(result.warnings):
        _check(result, cfg, methods)
    return result


class _Collect(logging.Handler):
    def __init__(self, seen: dict[str, int]) -> None:
        super().__init__(logging.WARNING)
        self.seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().strip().splitlines()
        msg = lines[0][:400] if lines else record.levelname
        self.seen[msg] = self.seen.get(msg, 0) + 1


@contextmanager
def _warnings_into(seen: dict[str, int]) -> Iterator[None]:
    """Count every WARNING (or worse) of the ``prunebench`` loggers into ``seen`` (they are still logged)."""
    logger, handler = logging.getLogger("prunebench"), _Collect(seen)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _check(result: ModelCheck, cfg: ZooConfig, methods: dict[str, type[PruningMethod]]) -> None:
    start, name = time.perf_counter(), result.model
    stage = "build"
    try:
        torch.manual_seed(cfg.seed)
        model = create_model(ModelConfig(name=name), num_classes=cfg.num_classes).eval()
        x = torch.randn(1, 3, cfg.size, cfg.size, generator=torch.Generator().manual_seed(cfg.seed))
        with torch.no_grad():
            model(x)
        result.params = sum(p.numel() for p in model.parameters())
        stage = "groups"
        t = time.perf_counter()
        build_groups(model, x, scope="all")
        result.groups_seconds = time.perf_counter() - t
        stage = "reach"
        reach = measure_reach(model, x, max_layer_ratio=cfg.max_layer_ratio)
    except Exception as exc:  # a model the harness cannot take: its row says why
        result.stage, result.error = stage, reason(exc)
        result.seconds = time.perf_counter() - start
        return
    result.macs = reach.dense_macs
    result.groups = {s: reach.scopes[s].groups for s in SCOPES}
    result.reach = {s: reach.scopes[s].reduction for s in SCOPES}
    for target in cfg.targets:
        try:
            scope, _ = resolve_scope(reach, "auto", [target], model=name)
        except UserError as exc:  # out of reach in every scope: every method's cell says so
            result.cuts.extend(Cut(m, target, error=reason(exc)) for m in methods)
            continue
        for method_name, cls in methods.items():
            result.cuts.append(_cut(model, x, cls, method_name, target, scope, cfg))
    result.seconds = time.perf_counter() - start


def _cut(
    dense: nn.Module,
    x: torch.Tensor,
    cls: type[PruningMethod],
    name: str,
    target: float,
    scope: str,
    cfg: ZooConfig,
) -> Cut:
    """One method prunes a fresh copy of ``dense`` to ``target``; then one training step's forward and backward."""
    cut = Cut(name, target, scope=scope)
    t = time.perf_counter()
    where = ""
    try:
        model = copy.deepcopy(dense)
        method = cls()
        calib = None
        if method.calibrated:
            g = torch.Generator().manual_seed(cfg.seed + 1)
            calib = Calibration(model=model, batches=[torch.randn(cfg.calib_images, *x.shape[1:], generator=g)])
        result = prune_to_target(
            model, method, target, x, scope=scope, max_layer_ratio=cfg.max_layer_ratio, calib=calib
        )
        cut.reduction = result.macs_reduction
        where = "forward and backward after the cut: "
        model.train()
        model(torch.randn(2, *x.shape[1:])).sum().backward()
        if not cut.ok:
            cut.error = f"achieved a MACs reduction of {cut.reduction:.3f}, more than {ON_TARGET} from {target:g}"
    except Exception as exc:
        cut.error = where + reason(exc)
    cut.seconds = time.perf_counter() - t
    return cut
