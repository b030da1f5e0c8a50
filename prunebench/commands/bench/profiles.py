"""Profiles of missed targets, so that a ``prunebench bench`` report says *why* a figure missed its bound.

torch.profiler operator tables for the training loops, the hooks and forward passes; on CPU oneDNN's log of
every convolution with its throughput (layout reorders show up there, not in torch.profiler); cProfile for
Python-level engine work (tracing, graph walks). See docs/architecture.md.
"""

from __future__ import annotations

import cProfile
import ctypes
import io
import os
import pstats
import re
import sys
import tempfile
from collections.abc import Callable

import torch
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

from prunebench.commands.bench.figures import Pruning
from prunebench.commands.bench.targets import Check
from prunebench.commands.bench.workload import Workload
from prunebench.errors import native_output_silenced
from prunebench.groups import build_groups
from prunebench.measure import count_macs, forward_call, latency_input, latency_ready
from prunebench.registry import build_method


def misses(checks: list[Check]) -> list[Check]:
    """The missed checks worth a profile: the first miss of every kind of figure."""
    done: set[str] = set()
    out = []
    for c in checks:
        if not c["pass"] and c["figure"] not in done:
            done.add(c["figure"])
            out.append(c)
    return out


def profile_miss(w: Workload, check: Check, pruning: Pruning) -> str:
    """A profile explaining one missed check (its ``key``: the method, where the figure has one)."""
    kind, key = check["figure"], check["key"]
    if kind == "loop_efficiency":
        return (
            "prunebench train():\n"
            + op_table(w.pb_loop(w.new_model()))
            + "\nhand-written loop:\n"
            + op_table(w.hand_loop(w.new_model()))
        )
    if kind == "reg_overhead":
        return _profile_hooks(w, key or "oicsr")
    if kind == "data_headroom":
        return op_table(lambda: [x.sum() for x, _ in w.epoch()])
    if kind == "speedup_efficiency":
        return _profile_forward(w, pruning, key or "")
    if kind in ("engine_s", "thinet_s", "macs_count_s"):
        return _profile_engine(w, pruning, kind)
    return ""


def _profile_hooks(w: Workload, name: str) -> str:
    model = w.new_model()
    _, groups = build_groups(model, w.example, scope="internal")
    method = build_method({"name": name})
    method.attach(model, groups)
    return f"{name}'s hooks alone (one step):\n" + op_table(w.hooks_call(method, model))


def _profile_forward(w: Workload, pruning: Pruning, key: str) -> str:
    x = latency_input(w.cfg.batch, (3, 32, 32), w.device)
    parts, split = [], []
    for label, m in (("dense", pruning.dense), (key, pruning.models[key].model)):
        net = latency_ready(m, w.device)
        table, conv_ms, total_ms = op_profile(forward_call(net, x), rows=8)
        split.append((conv_ms, total_ms))
        parts.append(f"{label} forward, batch {w.cfg.batch}, torch.profiler:\n{table}")
        if w.device.type == "cpu":
            parts.append(f"{label} forward, oneDNN verbose:\n" + onednn_summary(forward_call(net, x)))
    macs_ratio = pruning.models[key].macs_ratio
    return "\n\n".join(["diagnosis: " + speed_diagnosis(split[0], split[1], macs_ratio), *parts])


def _profile_engine(w: Workload, pruning: Pruning, kind: str) -> str:
    dense = pruning.dense
    if kind == "macs_count_s":
        return py_profile(lambda: count_macs(dense, w.example))
    name = "thinet" if kind == "thinet_s" else "oicsr"
    calib = w.calibration(dense) if kind == "thinet_s" else None
    return py_profile(lambda: w.prune(dense, build_method({"name": name}), calib, None))


# -- torch.profiler --------------------------------------------------------------------------------
_CONV_OPS = ("aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_slow_conv2d_forward", "aten::thnn_conv2d")


def op_table(fn: Callable[[], object], shapes: bool = False, rows: int = 14) -> str:
    """torch.profiler's operator table (self CPU time) for one call of ``fn``."""
    return op_profile(fn, shapes, rows)[0]


def op_profile(fn: Callable[[], object], shapes: bool = False, rows: int = 14) -> tuple[str, float, float]:
    """torch.profiler's operator table for one call of ``fn`` (after a warm call), with the milliseconds
    spent in convolution kernels and in all operators (self time, CPU or CUDA)."""
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    with native_output_silenced(2), profile(activities=acts, record_shapes=shapes) as prof:
        fn()
    events = prof.key_averages(group_by_input_shape=shapes)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    self_us = [(e.key, getattr(e, "self_device_time_total" if cuda else "self_cpu_time_total", 0.0)) for e in events]
    conv_ms = (
        sum(us for k, us in self_us if k in _CONV_OPS or "conv" in k.lower()) / 1e3
        if cuda
        else sum(us for k, us in self_us if k in _CONV_OPS) / 1e3
    )
    total_ms = sum(us for _, us in self_us) / 1e3
    table = str(events.table(sort_by=sort, row_limit=rows, max_name_column_width=40, max_shapes_column_width=60))
    return table, conv_ms, total_ms


def speed_diagnosis(dense: tuple[float, float], pruned: tuple[float, float], macs_ratio: float) -> str:
    """Why a pruned network is not ``macs_ratio`` times faster, from (convolution ms, total ms) profiles.

    Splits the time into convolutions and everything else (BatchNorm, ReLU, residual adds, pooling:
    memory-bound work that MACs hardly count), and bounds the efficiency the network could reach if its
    convolutions alone sped up by the full MACs ratio.
    """
    (cd, td), (cp, tp) = dense, pruned
    od, op = td - cd, tp - cp
    cap = td / (cd / macs_ratio + op) / macs_ratio
    return (
        f"convolutions {cd:.1f} -> {cp:.1f} ms (x{cd / max(cp, 1e-9):.2f} for x{macs_ratio:.2f} fewer MACs); "
        f"other operators {od:.1f} -> {op:.1f} ms ({100 * od / td:.0f}% -> {100 * op / tp:.0f}% of the time); "
        f"profiled speedup x{td / max(tp, 1e-9):.2f}. Even with convolutions x{macs_ratio:.2f} faster the other "
        f"operators would cap the efficiency at {cap:.2f}."
    )


# -- oneDNN's verbose log (CPU) --------------------------------------------------------------------
def onednn_summary(fn: Callable[[], object], rows: int = 8) -> str:
    """oneDNN's verbose log of one call of ``fn``: milliseconds per primitive kind and implementation
    (layout reorders show up here, not in torch.profiler), convolution throughput split by whether the
    channel counts are multiples of 8 (the AVX2 vector width), and the slowest convolutions."""
    lines = onednn_log(fn)
    if not lines:
        return "(oneDNN ran no primitive)"
    totals: dict[tuple[str, str], list[float]] = {}
    for f in lines:
        totals.setdefault((f[5], f[6]), []).append(float(f[-1]))
    table = [(kind, impl, len(ts), sum(ts)) for (kind, impl), ts in sorted(totals.items(), key=lambda kv: -sum(kv[1]))]
    out = [tabulate(table, headers=["primitive", "implementation", "calls", "ms"], floatfmt=".2f")]
    convs = []  # (fields, macs, channels multiples of 8, ms)
    for f in lines:
        macs, aligned = conv_macs(f[-2]) if f[5] == "convolution" else (0, False)
        if macs:
            convs.append((f, macs, aligned, float(f[-1])))
    for want in (True, False):
        sel = [(macs, ms) for _, macs, aligned, ms in convs if aligned == want]
        if sel:
            gmacs, ms = sum(m for m, _ in sel) / 1e9, sum(t for _, t in sel)
            what = "in and out channels multiples of 8" if want else "a channel count not a multiple of 8"
            out.append(
                f"convolutions with {what}: {len(sel)} calls, {gmacs:.2f} GMACs in {ms:.1f} ms = "
                f"{gmacs / max(ms, 1e-9) * 1e3:.1f} GMAC/s"
            )
    slowest = [
        (ms, macs / 1e9 / max(ms, 1e-9) * 1e3, f[6], f[-2].split("_ih")[0])
        for f, macs, _, ms in sorted(convs, key=lambda c: -c[3])[:rows]
    ]
    out += [
        "slowest convolutions:",
        tabulate(slowest, headers=["ms", "GMAC/s", "implementation", "problem"], floatfmt=(".2f", ".1f")),
    ]
    return "\n".join(out)


def onednn_log(fn: Callable[[], object]) -> list[list[str]]:
    """The comma-separated fields of every primitive oneDNN executed during one call of ``fn`` (after a warm
    call: primitive creation is not what we want to see). oneDNN prints with C stdio to file descriptor 1."""
    fn()
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        return [ln.split(",") for ln in log.read().splitlines() if ln.startswith("onednn_verbose") and ",exec," in ln]


_CONV_DESC = re.compile(
    r"mb(\d+)(?:_g(\d+))?_ic(\d+)oc(\d+)(?:_id\d+od\d+)?_ih(\d+)oh(\d+)kh(\d+).*?_iw(\d+)ow(\d+)kw(\d+)"
)


def conv_macs(desc: str) -> tuple[int, bool]:
    """Multiply-adds of a oneDNN convolution problem (``mb128_ic16oc9_ih32oh32kh3..._iw32ow32kw3...``) and
    whether its channel counts are multiples of 8; ``(0, False)`` when the text does not parse."""
    m = _CONV_DESC.search(desc)
    if m is None:
        return 0, False
    mb, g, ic, oc, _ih, oh, kh, _iw, ow, kw = (int(v) if v else 1 for v in m.groups())
    return mb * oc * (ic // g) * oh * ow * kh * kw, ic % 8 == 0 and oc % 8 == 0


# -- cProfile --------------------------------------------------------------------------------------
def py_profile(fn: Callable[[], object], rows: int = 18) -> str:
    """cProfile's cumulative-time table for one call of ``fn`` (Python-level work: tracing, graph walks)."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("cumulative").print_stats(rows)
    return buf.getvalue().strip()
