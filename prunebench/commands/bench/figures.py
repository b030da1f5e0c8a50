"""The figures of ``prunebench bench``, one function each, each returning a small typed result.

A figure takes what it needs as arguments (the :class:`~prunebench.commands.bench.workload.Workload`, the
step time measured by :func:`loop_efficiency`, the pruned models of :func:`prune_all`), so the order they run
in is the order their inputs exist. :class:`Measurements` gathers them into the report's figures and details.
See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunebench.budget import resolve_round_to
from prunebench.commands.bench.deployment import DeployFigure
from prunebench.commands.bench.workload import Workload, conv_widths
from prunebench.groups import build_groups
from prunebench.measure import count_macs, forward_call, latency_input, latency_ready
from prunebench.method import PruningMethod
from prunebench.recipe import method_label
from prunebench.registry import available_methods, build_method
from prunebench.timing import interleaved, median, paired_ratio, spread

REG_VARIANTS: tuple[dict[str, Any], ...] = (
    {"name": "oicsr", "variant": "growl"},
    {"name": "oicsr", "mode": "proximal"},
    {"name": "group_lasso", "mode": "proximal"},
)
"""Non-default regularizers, reported from their hook time alone (no target)."""

EXACT = "+exact"
"""In a model's label: the widths as pruned (``round_to`` 1, the papers' exact widths: ``l1+exact``), the
variant beside the main plan (``prune.round_to: auto`` by default); absent when the main plan is exact."""


# -- 1. loop efficiency ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopFigure:
    """images/s of prunebench's ``train()`` / images/s of a minimal hand-written loop (``ratio``)."""

    ratio: float
    hand_s: list[float]  # seconds per epoch of ``steps`` steps, every round
    prunebench_s: list[float]
    images: int  # per epoch
    steps: int

    @property
    def step_s(self) -> float:
        """Seconds per bare training step (the hand loop's), which :func:`data_headroom` compares against."""
        return median(self.hand_s) / self.steps

    def details(self) -> dict[str, Any]:
        return {
            "hand_images_per_s": self.images / median(self.hand_s),
            "prunebench_images_per_s": self.images / median(self.prunebench_s),
            "step_ms": 1e3 * self.step_s,
            "hand_s": self.hand_s,
            "prunebench_s": self.prunebench_s,
        }


def loop_efficiency(w: Workload) -> LoopFigure:
    """The hand loop and prunebench's loop on fresh copies of the model, interleaved; the ratio is the
    median over rounds of hand seconds / prunebench seconds (the figure with the tightest bound gets twice
    the rounds)."""
    fns = {"hand": w.hand_loop(w.new_model()), "prunebench": w.pb_loop(w.new_model())}
    t = w.time(fns, 2 * w.cfg.reps)
    return LoopFigure(
        ratio=paired_ratio(t["hand"], t["prunebench"]),
        hand_s=t["hand"],
        prunebench_s=t["prunebench"],
        images=w.cfg.batch * w.cfg.steps,
        steps=w.cfg.steps,
    )


# -- 2. regularization overhead --------------------------------------------------------------------
@dataclass(frozen=True)
class RegFigure:
    """Per method: (plain step + the method's hooks) / plain step, and the end-to-end step ratio."""

    overhead: dict[str, float]  # default methods: 1 + hook_ms / plain_step_ms
    step: dict[str, float]  # end-to-end: train() with the hooks / without (the noise floor for no hooks)
    variants: dict[str, float]  # REG_VARIANTS, from the hook time alone
    plain_step_ms: float
    noise_floor: float
    groups: int
    measured: list[str]  # methods whose step ratio was measured (the others have no hooks)
    hook_ms: dict[str, float]

    def details(self) -> dict[str, Any]:
        return {
            "plain_step_ms": self.plain_step_ms,
            "noise_floor": self.noise_floor,
            "groups": self.groups,
            "measured": self.measured,
            "hook_ms": self.hook_ms,
            "hook_fraction": {k: v / self.plain_step_ms for k, v in self.hook_ms.items()},
        }


def reg_overhead(w: Workload) -> RegFigure:
    """Per method: (plain step + the method's hooks) / plain step, on groups of ``internal`` scope.

    Two measurements. ``overhead`` adds the hooks timed alone (penalty, its backward, after_backward,
    after_step: ``hook_ms``, many repetitions) to the plain step; it is precise even when the hooks cost far
    less than the run-to-run noise of a whole step. ``step`` is the end-to-end check: one-step epochs of
    ``train()`` with the hooks against the same without, interleaved, the median over rounds of the paired
    ratio. Methods without hooks are trained with ``method=None`` by the pipeline, so their step *is* the
    plain step (overhead 1); their end-to-end entry is a second plain measurement against the first: the
    noise floor. The non-default variants (:data:`REG_VARIANTS`) are reported from the hook timing only.
    """
    model = w.new_model()
    _, groups = build_groups(model, w.example, scope="internal")
    methods: dict[str, PruningMethod] = {}
    for spec in [*({"name": n} for n in available_methods()), *REG_VARIANTS]:
        m = build_method(spec)
        m.attach(model, groups)
        methods[method_label(spec)] = m
    hooked = [k for k, m in methods.items() if type(m).has_sparsity_training() and "(" not in k]
    fns: dict[str, Callable[[], object]] = {"plain": w.pb_loop(model, progress=False, steps=1)}
    fns.update({k: w.pb_loop(model, methods[k], progress=False, steps=1) for k in hooked})
    fns["plain (again)"] = w.pb_loop(model, progress=False, steps=1)
    t = w.time(fns, w.cfg.reps * w.cfg.steps)
    step_ms = 1e3 * median(t["plain"])
    floor = paired_ratio(t["plain (again)"], t["plain"])
    hook_ms = {k: 1e3 * hook_seconds(w, m, model) for k, m in methods.items()}
    overhead = {k: 1 + hook_ms[k] / step_ms for k in methods if "(" not in k}
    return RegFigure(
        overhead=overhead,
        step={k: paired_ratio(t[k], t["plain"]) if k in t else floor for k in overhead},
        variants={k: 1 + hook_ms[k] / step_ms for k in methods if "(" in k},
        plain_step_ms=step_ms,
        noise_floor=floor,
        groups=len(groups),
        measured=hooked,
        hook_ms=hook_ms,
    )


def hook_seconds(w: Workload, method: PruningMethod, model: nn.Module) -> float:
    """Seconds per step of the method's hooks alone (median of 20 after 3 warm-up calls); 0 without hooks."""
    if not type(method).has_sparsity_training():
        return 0.0
    return median(interleaved({"hooks": w.hooks_call(method, model)}, 20, 3, w.device)["hooks"])


# -- 3. data headroom ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataFigure:
    """Batches/s the augmentation pipeline delivers / batches/s the training step consumes (``ratio``)."""

    batches_per_s: float
    step_s: float  # seconds of a bare training step

    @property
    def ratio(self) -> float:
        return self.batches_per_s * self.step_s

    def details(self) -> dict[str, Any]:
        return {"batches_per_s": self.batches_per_s, "step_batches_per_s": 1 / self.step_s}


def data_headroom(w: Workload, step_s: float) -> DataFigure:
    """Batches/s of the augmentation pipeline (an epoch of ``train_batches``, every batch made) against
    ``step_s``, the seconds of a bare training step (:attr:`LoopFigure.step_s`)."""

    def one_epoch() -> None:
        for x, _ in w.epoch():
            x.sum()  # touch the batch (on CUDA, the kernels queue; the timer syncs)

    per_epoch = median(w.time({"data": one_epoch}, max(w.cfg.reps, 10))["data"])
    return DataFigure(batches_per_s=w.cfg.steps / per_epoch, step_s=step_s)


# -- 4. pruning every method, and the real speedup -------------------------------------------------
@dataclass(frozen=True)
class PrunedModel:
    """One method's prune of the dense model to the MACs target: the model and what the engine reported."""

    model: nn.Module
    seconds: float
    timings: dict[str, float]
    macs: float
    macs_ratio: float  # dense MACs / pruned MACs
    macs_reduction: float
    uniform: bool  # a calibration-based method (ThiNet): its selection is the plan step

    def details(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "timings": self.timings,
            "macs": self.macs,
            "macs_ratio": self.macs_ratio,
            "macs_reduction": self.macs_reduction,
            "uniform": self.uniform,
            "widths": conv_widths(self.model),
        }


@dataclass(frozen=True)
class Pruning:
    """The dense (untrained) model and its pruned copies by label: the main plan's (``l1``), the exact widths'
    (``l1+exact``)."""

    dense: nn.Module
    round_to: int  # the main plan's channel multiple (1: the widths as pruned)
    models: dict[str, PrunedModel] = field(default_factory=dict)

    @property
    def main(self) -> dict[str, PrunedModel]:
        """The main plan's models (the default recipe's widths), by method name."""
        return {k: p for k, p in self.models.items() if EXACT not in k}


def prune_all(w: Workload) -> Pruning:
    """Prune a copy of the dense (untrained) model with every method: the main plan (``round_to`` as configured,
    ``auto`` by default: the device's vector width) and, when that rounds, the widths as pruned (``+exact``).

    Scores come from the untrained model (cheap, and speed depends on the widths, not on accuracy);
    at initialization every BN gamma is 1, so slimming's ranking is all ties, broken by group order.
    """
    dense = w.new_model().eval()
    dense_macs = count_macs(dense, w.example).macs
    w.prune(dense, build_method({"name": "l1"}), None, None)  # warm-up: imports, tracer caches
    main = resolve_round_to(w.cfg.round_to, w.device)
    out = Pruning(dense, round_to=main or 1)
    plans = {"": main, **({EXACT: None} if main is not None else {})}
    for name, cls in available_methods().items():
        for suffix, rt in plans.items():
            label = name + suffix
            calib = w.calibration(dense) if cls.calibrated else None
            torch.manual_seed(0)
            model, res = w.prune(dense, build_method({"name": name}), calib, rt)
            out.models[label] = PrunedModel(
                model=model,
                seconds=res.seconds,
                timings=res.timings,
                macs=res.macs_after,
                macs_ratio=dense_macs / res.macs_after,
                macs_reduction=res.macs_reduction,
                uniform=cls.calibrated,
            )
    return out


@dataclass(frozen=True)
class SpeedFigure:
    """Per pruned model: dense latency / pruned latency at batch 1 and at the bench batch."""

    batch: int
    speedup: dict[str, float]  # at the bench batch
    speedup_b1: dict[str, float]
    macs_ratio: dict[str, float]
    latency_ms: dict[int, dict[str, float]]  # batch -> model (``dense`` too) -> median milliseconds
    spread: float  # of the dense model's rounds at the bench batch
    times: dict[int, dict[str, list[float]]]  # batch -> everything in the rounds -> seconds per round

    @property
    def efficiency(self) -> dict[str, float]:
        """speedup / macs_ratio at the bench batch: 1 when fewer MACs are proportionally faster."""
        return {k: v / self.macs_ratio[k] for k, v in self.speedup.items()}

    def figures(self) -> dict[str, dict[str, float]]:
        """``speedup``, ``speedup_b1``, ``macs_ratio``, ``speedup_efficiency`` of the main plan, then the same
        ``_exact`` (the widths as pruned; empty when the main plan is exact)."""
        out: dict[str, dict[str, float]] = {}
        eff = self.efficiency
        for suffix, exact in (("", False), ("_exact", True)):
            keys = [k for k in self.speedup if (EXACT in k) == exact]
            out["speedup" + suffix] = {k: self.speedup[k] for k in keys}
            out["speedup_b1" + suffix] = {k: self.speedup_b1[k] for k in keys}
            out["macs_ratio" + suffix] = {k: self.macs_ratio[k] for k in keys}
            out["speedup_efficiency" + suffix] = {k: eff[k] for k in keys}
        return out


def speedup(
    w: Workload, pruning: Pruning, extra: Callable[[int, torch.Tensor], dict[str, Callable[[], object]]] | None = None
) -> SpeedFigure:
    """Latency of every pruned model against the dense one at batch 1 and the bench batch.

    All models run in every round (interleaved), with ``extra``'s calls (batch, input -> name -> call: the ONNX
    Runtime sessions and compiled models, paired by :func:`~prunebench.commands.bench.deployment.deploy_figure`
    from ``times``); a speedup is the median over rounds of the paired ratio dense / pruned. Latencies are
    plain medians.
    """
    nets = {"dense": latency_ready(pruning.dense, w.device)}
    nets.update({k: latency_ready(p.model, w.device) for k, p in pruning.models.items()})
    lat: dict[int, dict[str, float]] = {}
    speed: dict[int, dict[str, float]] = {}
    times: dict[int, dict[str, list[float]]] = {}
    noise = float("nan")
    for bs in dict.fromkeys((1, w.cfg.batch)):
        x = latency_input(bs, (3, 32, 32), w.device)
        fns: dict[str, Callable[[], object]] = {k: forward_call(net, x) for k, net in nets.items()}
        fns.update(extra(bs, x) if extra is not None else {})
        t = times[bs] = interleaved(fns, w.cfg.latency_reps * (4 if bs == 1 else 1), 2 * w.cfg.warmup, w.device)
        lat[bs] = {k: 1e3 * median(t[k]) for k in nets}
        if bs == w.cfg.batch:
            noise = spread(t["dense"])
        speed[bs] = {k: paired_ratio(t["dense"], t[k]) for k in pruning.models}
    return SpeedFigure(
        batch=w.cfg.batch,
        speedup=speed[w.cfg.batch],
        speedup_b1=speed[1],
        macs_ratio={k: p.macs_ratio for k, p in pruning.models.items()},
        latency_ms=lat,
        spread=noise,
        times=times,
    )


# -- 5. engine cost --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineFigure:
    """Seconds of one prune-to-target call, of ThiNet's selection and of one fvcore count."""

    engine_s: float  # median over the score-based methods (the main plan)
    thinet_s: float  # the plan step of the calibration-based methods (the slowest)
    macs_count_s: float
    engine_s_each: list[float]

    def details(self) -> dict[str, Any]:
        return {"engine_s_max": max(self.engine_s_each), "engine_s_each": self.engine_s_each}


def engine_costs(w: Workload, pruning: Pruning) -> EngineFigure:
    """engine_s and thinet_s from the calls of :func:`prune_all`; macs_count_s timed here."""
    plain = pruning.main
    scored = [p.seconds for p in plain.values() if not p.uniform]
    thinet = [p.timings.get("plan", float("nan")) for p in plain.values() if p.uniform]
    counts = w.time({"count": lambda: count_macs(pruning.dense, w.example)}, w.cfg.reps)["count"]
    return EngineFigure(
        engine_s=median(scored),
        thinet_s=max(thinet) if thinet else float("nan"),
        macs_count_s=median(counts),
        engine_s_each=scored,
    )


# -- all of them -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurements:
    """Every figure of one run, turned into the report's flat ``figures`` and its ``details``."""

    loop: LoopFigure
    data: DataFigure
    reg: RegFigure
    pruning: Pruning
    speed: SpeedFigure
    engine: EngineFigure
    deploy: DeployFigure

    def figures(self) -> dict[str, Any]:
        return {
            "loop_efficiency": self.loop.ratio,
            "data_headroom": self.data.ratio,
            "reg_overhead": self.reg.overhead,
            "reg_overhead_step": self.reg.step,
            "reg_overhead_variants": self.reg.variants,
            **self.speed.figures(),
            **self.deploy.figures(),
            "engine_s": self.engine.engine_s,
            "thinet_s": self.engine.thinet_s,
            "macs_count_s": self.engine.macs_count_s,
        }

    def noise(self) -> dict[str, float]:
        """The spreads of repeated identical work and the no-hooks noise floor minus 1 (see ``is_noisy``)."""
        return {
            "loop_spread": spread(self.loop.hand_s),
            "reg_floor_minus_1": self.reg.noise_floor - 1,
            "latency_spread": self.speed.spread,
        }

    def details(self) -> dict[str, Any]:
        return {
            "noise": self.noise(),
            "loop": self.loop.details(),
            "data": self.data.details(),
            "reg": self.reg.details(),
            "prune": {k: p.details() for k, p in self.pruning.models.items()},
            "latency_ms": {str(bs): v for bs, v in self.speed.latency_ms.items()},
            "deploy": self.deploy.details(),
            "engine": self.engine.details(),
        }
