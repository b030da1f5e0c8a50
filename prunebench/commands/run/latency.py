"""The speed figures of one cell: its pruned model against its seed's dense model, in eager PyTorch and in
ONNX Runtime, all four timed in the same interleaved rounds (:func:`prunebench.measure.paired_latency`), at
batch 1 and at the recipe's latency batch. A speedup is the median of per-round ratios and comes with its
spread, so a neighbour's load shows as a noisy figure instead of a wrong one (docs/fairness.md, speed).

A model that does not export to ONNX (or whose ONNX outputs differ from PyTorch's) keeps its cell FINISHED:
the ONNX figures are left out and :data:`~prunebench.tracking.schema.ONNX_ERROR_TAG` says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from prunebench.commands.run.context import Context
from prunebench.deploy import ExportError, OrtModel, deploy
from prunebench.measure import Caller, eager_caller, paired_latency
from prunebench.tracking import schema

log = logging.getLogger(__name__)


@dataclass
class Speed:
    """What a cell logs about speed: metrics, tags (why ONNX figures are missing) and the exported file."""

    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    onnx_file: Path | None = None


def _dense_onnx(ctx: Context, dense: nn.Module, seed: int, folder: Path) -> OrtModel:
    """The dense model of ``seed`` in ONNX Runtime, exported once per invocation (a failure is kept too)."""
    if seed not in ctx.dense_onnx:
        try:
            ctx.dense_onnx[seed] = deploy(dense, ctx.sample_shape, folder / f"dense-s{seed}.onnx", ctx.device)
        except ExportError as exc:
            ctx.dense_onnx[seed] = exc
    found = ctx.dense_onnx[seed]
    if isinstance(found, ExportError):
        raise ExportError(f"the dense model: {found}")
    return found


def measure_speed(ctx: Context, dense: nn.Module, model: nn.Module, seed: int, onnx_path: Path) -> Speed:
    """Time ``model`` against ``dense`` (eager, and in ONNX Runtime unless ``measure.onnx`` is off)."""
    m = ctx.recipe.measure
    callers: dict[str, Caller] = {
        "dense": eager_caller(dense, ctx.sample_shape, ctx.device),
        "pruned": eager_caller(model, ctx.sample_shape, ctx.device),
    }
    baselines = {"pruned": "dense"}
    speed = Speed(metrics={})
    if m.onnx:
        try:
            dense_ort = _dense_onnx(ctx, dense, seed, onnx_path.parent)
            pruned_ort = deploy(model, ctx.sample_shape, onnx_path, ctx.device)
        except ExportError as exc:
            speed.tags[schema.ONNX_ERROR_TAG] = str(exc)
            log.warning("  no ONNX Runtime figures for this cell: %s", exc)
        else:
            callers.update(dense_onnx=dense_ort.timed_call, pruned_onnx=pruned_ort.timed_call)
            baselines["pruned_onnx"] = "dense_onnx"
            speed.onnx_file = onnx_path
    big = m.latency_batch
    res = paired_latency(callers, baselines, (1, big), warmup=m.warmup, rounds=m.repeats)
    one, batch = res[1]["pruned"], res[big]["pruned"]
    speed.metrics = {
        "latency_ms": one.ms,
        "latency_ms_batch": batch.ms,
        "dense_latency_ms": one.baseline_ms,
        "dense_latency_ms_batch": batch.baseline_ms,
        "speedup": batch.speedup,
        "speedup_spread": batch.spread,
        "speedup_b1": one.speedup,
        "speedup_b1_spread": one.spread,
    }
    if "pruned_onnx" in baselines:
        one, batch = res[1]["pruned_onnx"], res[big]["pruned_onnx"]
        speed.metrics.update(
            onnx_latency_ms=one.ms,
            onnx_latency_ms_batch=batch.ms,
            dense_onnx_latency_ms=one.baseline_ms,
            dense_onnx_latency_ms_batch=batch.baseline_ms,
            onnx_speedup=batch.speedup,
            onnx_speedup_spread=batch.spread,
        )
    return speed
