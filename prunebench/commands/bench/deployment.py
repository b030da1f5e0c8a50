"""ONNX Runtime and torch.compile beside eager PyTorch in ``prunebench bench``'s speedup figure, and where the
batch-1 time of the dense forward goes.

:func:`prepare` exports the dense model and the main plan's pruned models to ONNX (:mod:`prunebench.deploy`)
and compiles them with ``torch.compile`` (each its own code object, so that no model's graphs evict
another's); :meth:`Deployment.callers` adds them to the eager models' interleaved rounds; :func:`deploy_figure`
pairs each with its dense counterpart (dense ONNX -> pruned ONNX, dense compiled -> pruned compiled).
:func:`forward_breakdown` splits one forward's wall time into convolutions, other operators and the rest
(Python, dispatcher, framework) with torch.profiler. See docs/architecture.md.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from prunebench.commands.bench.workload import Workload
from prunebench.deploy import ExportError, OrtModel, deploy
from prunebench.errors import native_output_silenced, one_line
from prunebench.measure import forward_call, latency_input, latency_ready
from prunebench.timing import Paired, pair

ONNX = "onnx:"
"""Prefix of an ONNX Runtime session's name in the timing rounds (``onnx:dense``, ``onnx:l1``)."""
COMPILED = "compiled:"
"""Prefix of a compiled model's name in the timing rounds."""
SHAPE = (3, 32, 32)


class _Compiled(nn.Module):
    """``net`` called through its own compiled function, so that :func:`forward_call` can time it."""

    def __init__(self, net: nn.Module, fn: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__()
        self.net = net
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.net, x)


def _call(net: nn.Module, x: Tensor) -> Tensor:
    return net(x)


def compile_model(net: nn.Module, name: str) -> nn.Module:
    """``torch.compile(dynamic=False)`` of ``net`` through a function with a code object of its own: dynamo
    caches graphs per code object, and the models of one architecture would otherwise share (and overflow)
    one cache, falling back to eager."""
    code = _call.__code__.replace(co_name=f"_call_{''.join(c if c.isalnum() else '_' for c in name)}")
    fn = types.FunctionType(code, _call.__globals__, code.co_name)
    return _Compiled(net, torch.compile(fn, dynamic=False))


def compile_unavailable(device: torch.device) -> str:
    """Why torch.compile cannot run here (inductor builds C++ kernels on the CPU), or ``""``."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return "torch.compile skipped: no C++ compiler (g++ or c++) on PATH, which inductor needs for CPU kernels"
    return ""


@dataclass
class Deployment:
    """The dense model and the main plan's pruned models as ONNX Runtime sessions and compiled modules."""

    onnx: dict[str, OrtModel] = field(default_factory=dict)
    onnx_errors: dict[str, str] = field(default_factory=dict)
    export_s: float = 0.0
    compiled: dict[str, nn.Module] = field(default_factory=dict)
    compile_errors: dict[str, str] = field(default_factory=dict)
    compile_note: str = ""  # why nothing was compiled ("" when compiled)
    compile_s: dict[str, float] = field(default_factory=dict)  # first calls at both batch sizes (compilation)

    def callers(self, batch: int, x: Tensor) -> dict[str, Callable[[], object]]:
        """Every session and compiled model, one call each on a batch of ``batch`` (``x`` for compiled ones)."""
        fns: dict[str, Callable[[], object]] = {ONNX + k: m.timed_call(batch) for k, m in self.onnx.items()}
        fns.update({COMPILED + k: forward_call(m, x) for k, m in self.compiled.items()})
        return fns


def prepare(w: Workload, models: dict[str, nn.Module], compile_models: bool, note: str = "") -> Deployment:
    """Export every model of ``models`` (``dense`` first) to ONNX Runtime and, with ``compile_models``, compile
    it and run it once at batch 1 and at the bench batch (the compilation). ``note`` says why compile is off."""
    out = Deployment(compile_note=note)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunebench-bench-") as tmp:
        for k, m in models.items():
            try:
                out.onnx[k] = deploy(m, SHAPE, Path(tmp) / f"{k}.onnx", w.device, check=False)
            except ExportError as exc:
                out.onnx_errors[k] = one_line(exc, 300)
    out.export_s = time.perf_counter() - t0
    if compile_models and not note:
        out.compile_note = compile_unavailable(w.device)
    if not compile_models or out.compile_note:
        return out
    inputs = [latency_input(bs, SHAPE, w.device) for bs in dict.fromkeys((1, w.cfg.batch))]
    for k, m in models.items():
        t0 = time.perf_counter()
        try:
            net = compile_model(latency_ready(m, w.device), k)
            for x in inputs:
                forward_call(net, x)()
        except Exception as exc:  # inductor fails in many ways (compiler, codegen, a missing header)
            out.compile_errors[k] = one_line(exc, 300)
            continue
        out.compiled[k] = net
        out.compile_s[k] = time.perf_counter() - t0
    if not out.compiled:
        out.compile_note = "torch.compile failed: " + next(iter(out.compile_errors.values()), "no model")
    return out


# -- where the batch-1 time goes -------------------------------------------------------------------
_CONV = "conv"


@dataclass(frozen=True)
class Breakdown:
    """One forward's wall milliseconds under torch.profiler, split by operator self time."""

    wall_ms: float
    conv_ms: float  # self time of the convolution operators (kernels and their aten wrappers)
    other_ms: float  # self time of every other operator
    calls: int  # forwards profiled (the figures are per forward)
    top: list[tuple[str, float]]  # the operators with the most self time, ms per forward

    @property
    def remainder_ms(self) -> float:
        """Wall time outside every operator: Python, the dispatcher, the framework."""
        return self.wall_ms - self.conv_ms - self.other_ms

    def details(self) -> dict[str, Any]:
        return {
            "wall_ms": self.wall_ms,
            "conv_ms": self.conv_ms,
            "other_ms": self.other_ms,
            "remainder_ms": self.remainder_ms,
            "calls": self.calls,
            "top": dict(self.top),
        }


def forward_breakdown(fn: Callable[[], object], calls: int = 20) -> Breakdown:
    """Profile ``calls`` calls of ``fn`` (after a warm one) with torch.profiler's CPU activity: the wall time per
    call and the self time of the operators (``aten::``, ``mkldnn::``, ...; annotations such as a compiled
    region's are left out: what they cover that is not an operator counts as the remainder)."""
    fn()
    with native_output_silenced(2), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = time.perf_counter() - t0
    ops = [(e.key, e.self_cpu_time_total / 1e3 / calls) for e in prof.key_averages() if _is_operator(e.key)]
    conv = sum(ms for k, ms in ops if _CONV in k.lower())
    return Breakdown(
        wall_ms=1e3 * wall / calls,
        conv_ms=conv,
        other_ms=sum(ms for _, ms in ops) - conv,
        calls=calls,
        top=sorted(ops, key=lambda kv: -kv[1])[:6],
    )


def _is_operator(key: str) -> bool:
    return "::" in key and not key.startswith("#")


def breakdowns(w: Workload, dense: nn.Module, dep: Deployment) -> dict[str, Breakdown]:
    """The dense model's batch-1 forward, eager and (when compiled) compiled."""
    x = latency_input(1, SHAPE, w.device)
    calls = 10 if w.cfg.quick else 50
    out = {"eager": forward_breakdown(forward_call(latency_ready(dense, w.device), x), calls)}
    if "dense" in dep.compiled:
        out["compiled"] = forward_breakdown(forward_call(dep.compiled["dense"], x), calls)
    return out


# -- the figure ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeployFigure:
    """Per pruned model of the main plan: ONNX Runtime and compiled latency and speedup over their dense."""

    batch: int
    onnx: dict[int, dict[str, Paired]]  # batch -> model (``dense`` too) -> against the dense ONNX model
    compiled: dict[int, dict[str, Paired]]
    vs_eager: dict[str, dict[int, Paired]]  # "onnx"/"compiled" -> batch -> the dense model against eager dense
    macs_ratio: dict[str, float]
    dep: Deployment
    breakdown: dict[str, Breakdown]

    def figures(self) -> dict[str, dict[str, float]]:
        """``onnx_speedup``, ``onnx_speedup_b1``, ``onnx_efficiency``, ``compiled_speedup``, ``compiled_speedup_b1``."""
        b, out = self.batch, {}
        for kind, paired in (("onnx", self.onnx), ("compiled", self.compiled)):
            out[f"{kind}_speedup"] = {k: p.speedup for k, p in paired.get(b, {}).items() if k != "dense"}
            out[f"{kind}_speedup_b1"] = {k: p.speedup for k, p in paired.get(1, {}).items() if k != "dense"}
        out["onnx_efficiency"] = {k: v / self.macs_ratio[k] for k, v in out["onnx_speedup"].items()}
        return out

    def details(self) -> dict[str, Any]:
        d = self.dep
        return {
            "onnx_ms": {str(bs): {k: p.ms for k, p in v.items()} for bs, v in self.onnx.items()},
            "compiled_ms": {str(bs): {k: p.ms for k, p in v.items()} for bs, v in self.compiled.items()},
            "vs_eager": {kind: {str(bs): p.speedup for bs, p in v.items()} for kind, v in self.vs_eager.items()},
            "onnx_errors": d.onnx_errors,
            "onnx_providers": sorted({p for m in d.onnx.values() for p in m.providers[:1]}),
            "export_s": d.export_s,
            "compile_note": d.compile_note,
            "compile_errors": d.compile_errors,
            "compile_s": d.compile_s,
            "breakdown_b1": {k: v.details() for k, v in self.breakdown.items()},
        }


def deploy_figure(
    dep: Deployment,
    times: dict[int, dict[str, list[float]]],
    macs_ratio: dict[str, float],
    breakdown: dict[str, Breakdown],
) -> DeployFigure:
    """Pair every session and compiled model with its dense counterpart, round by round (``times``: batch ->
    name in the rounds -> seconds, eager ``dense`` included)."""
    paired: dict[str, dict[int, dict[str, Paired]]] = {"onnx": {}, "compiled": {}}
    vs_eager: dict[str, dict[int, Paired]] = {"onnx": {}, "compiled": {}}
    for kind, prefix, models in (("onnx", ONNX, dep.onnx), ("compiled", COMPILED, dep.compiled)):
        if "dense" not in models:
            continue
        for bs, t in times.items():
            base = t[prefix + "dense"]
            paired[kind][bs] = {k: pair(t[prefix + k], base) for k in models}
            vs_eager[kind][bs] = pair(base, t["dense"])
    return DeployFigure(
        batch=max(times),
        onnx=paired["onnx"],
        compiled=paired["compiled"],
        vs_eager=vs_eager,
        macs_ratio=macs_ratio,
        dep=dep,
        breakdown=breakdown,
    )
