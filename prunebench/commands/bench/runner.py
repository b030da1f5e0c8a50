"""``run_bench``: measure every figure of ``prunebench bench`` in one process, profile the misses, and build
the report. Progress lines are INFO log records stamped with the seconds since the start.

See docs/architecture.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from prunebench.commands.bench import deployment, figures
from prunebench.commands.bench.config import BenchConfig
from prunebench.commands.bench.machine import machine_info, report_name
from prunebench.commands.bench.profiles import misses, profile_miss
from prunebench.commands.bench.report import BenchReport, build_report
from prunebench.commands.bench.targets import check_targets
from prunebench.commands.bench.workload import Workload
from prunebench.errors import UserError
from prunebench.models import list_models
from prunebench.timing import torch_threads

log = logging.getLogger(__name__)


def check_config(cfg: BenchConfig) -> None:
    """A :class:`UserError` for a model the bench cannot build or a device that is not there."""
    if cfg.model not in list_models("*_cifar"):
        raise UserError(f"bench: --model {cfg.model!r} is not a CIFAR model; see 'prunebench models *_cifar'")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("bench: --device cuda but no CUDA device is available; use --device cpu")


def run_bench(cfg: BenchConfig, *, command: Sequence[str] = ("bench",), threads: int | None = None) -> BenchReport:
    """Run every figure, check it against its target, profile the misses; ``command`` is recorded in the report.

    ``threads``: torch intra-op threads for the run (restored after it). ``None`` leaves torch's choice, except
    that a quick run is single-threaded: a tiny model gains nothing from a second thread, and one thread keeps
    the smoke test fast on a machine other jobs share.
    """
    check_config(cfg)
    with torch_threads(threads if threads is not None else (1 if cfg.quick else None)):
        return _measure(cfg, command)


class _Clock:
    """Progress messages stamped with the seconds since the run started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str, level: int = logging.INFO) -> None:
        log.log(level, "[%6.1f s] %s", self.seconds, msg)


def _measure(cfg: BenchConfig, command: Sequence[str]) -> BenchReport:
    clock = _Clock()
    w = Workload(cfg)
    machine = machine_info(w.device)  # the load average before the bench adds its own
    clock.say(f"bench {cfg.model}, batch {cfg.batch}, on {w.device} ({torch.get_num_threads()} threads)")
    load = machine.get("load_avg_start")
    if load is not None and load > 1.0 and w.device.type == "cpu":
        clock.say(
            f"warning: load average {load}: other processes share the CPU, the figures will be noisy", logging.WARNING
        )
    clock.say("loop efficiency")
    loop = figures.loop_efficiency(w)
    clock.say("data headroom")
    data = figures.data_headroom(w, loop.step_s)
    clock.say("regularization overhead")
    reg = figures.reg_overhead(w)
    clock.say("pruning every method")
    pruning = figures.prune_all(w)
    dep = _deploy(w, pruning, clock)
    clock.say("latency of pruned models (eager, ONNX Runtime" + (", compiled)" if dep.compiled else ")"))
    speed = figures.speedup(w, pruning, dep.callers)
    clock.say("where the batch-1 time goes")
    macs = {k: p.macs_ratio for k, p in pruning.main.items()}
    deploy = deployment.deploy_figure(dep, speed.times, macs, deployment.breakdowns(w, pruning.dense, dep))
    clock.say("engine costs")
    engine = figures.engine_costs(w, pruning)
    m = figures.Measurements(loop=loop, data=data, reg=reg, pruning=pruning, speed=speed, engine=engine, deploy=deploy)
    checks = check_targets(m.figures(), w.device)
    profiles: dict[str, str] = {}
    if cfg.profile:
        for check in misses(checks):
            clock.say(f"profiling {check['name']} (missed)")
            profiles[check["name"]] = profile_miss(w, check, pruning)
    document = build_report(m, cfg, machine, checks, profiles, command, clock.seconds)
    return BenchReport(document=document, name=report_name(w.device))


def _deploy(w: Workload, pruning: figures.Pruning, clock: _Clock) -> deployment.Deployment:
    """The main plan's models exported to ONNX Runtime and, unless ``--no-compile``/``--quick``, compiled."""
    models = {"dense": pruning.dense, **{k: p.model for k, p in pruning.main.items()}}
    note = "" if w.cfg.compile else "torch.compile skipped (" + ("--quick" if w.cfg.quick else "--no-compile") + ")"
    what = "exporting to ONNX" + ("" if note else " and compiling with torch.compile")
    clock.say(f"{what}: dense and the {len(models) - 1} pruned models of the main plan")
    dep = deployment.prepare(w, models, w.cfg.compile, note)
    for what, errors in (("ONNX export", dep.onnx_errors), ("torch.compile", dep.compile_errors)):
        for k, why in errors.items():
            clock.say(f"{what} of {k} failed: {why}", logging.WARNING)
    if dep.compile_s:
        clock.say(f"compiled {len(dep.compile_s)} models in {sum(dep.compile_s.values()):.1f} s")
    elif dep.compile_note:
        clock.say(dep.compile_note)
    return dep
