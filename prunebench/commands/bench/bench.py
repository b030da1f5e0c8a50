"""``prunebench bench``: the measured speed of the harness itself and of the networks it prunes.

A benchmark harness that wastes compute distorts every budget it reports, and "50% fewer MACs" that is
not faster on the hardware misleads. This command measures, side by side in one process, five figures
(ratios, so that they can be tracked across machines), each the median of several repetitions after a
warm-up, with the competing variants interleaved repetition by repetition so that a load change on a
shared machine hits both sides of a ratio alike (ratios are medians over rounds of paired ratios):

1. ``loop_efficiency`` -- images/s of :func:`prunebench.train.train` (data pipeline with augmentation,
   hooks, progress bar, metric accumulation) / images/s of a minimal hand-written loop on the same
   model, batch, optimizer and in-memory tensors (pre-normalized, no augmentation).
2. ``reg_overhead`` -- per method, seconds per training step with the method's hooks / plain step,
   as (plain step + the hooks timed alone) / plain step; ``reg_overhead_step`` is the end-to-end check.
3. ``data_headroom`` -- batches/s the in-memory augmentation pipeline delivers / batches/s the
   training step consumes.
4. ``speedup`` -- per method at the MACs target: dense latency / pruned latency (eval, inference mode,
   channels_last: :func:`prunebench.measure.latency_ready`) at batch 1 and at the bench batch, next to
   ``macs_ratio`` (dense MACs / pruned MACs); ``speedup_efficiency = speedup / macs_ratio`` at the bench
   batch. Also with the engine's ``round_to`` (channel counts kept multiples of 8).
5. ``engine_s``, ``thinet_s``, ``macs_count_s`` -- seconds for one prune-to-target call, for ThiNet's
   selection and reconstruction, and for one fvcore count.

Results go to ``<out>/<name>.json`` and ``<out>/<name>.md``. Where a target is missed the Markdown
carries a profile of that figure (torch.profiler operator tables; on CPU oneDNN's log of every
convolution, with its throughput; cProfile for Python-level engine work), so the report says *why*
rather than guessing. A run whose repetitions of identical work disagree is flagged as noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import itertools
import json
import math
import os
import platform
import pstats
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunebench.errors import UserError

# -- targets ---------------------------------------------------------------------------------------

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
    "speedup_efficiency": Target("speedup_efficiency", 0.8, True, "fewer MACs are real speed"),
    "engine_s": Target("engine_s", 3.0, False, "pruning is cheap next to training"),
    "thinet_s": Target("thinet_s", 60.0, False, "calibration-based selection is cheap"),
    "macs_count_s": Target("macs_count_s", 1.0, False, "counting is cheap"),
}

REG_VARIANTS: tuple[dict[str, Any], ...] = (
    {"name": "oicsr", "variant": "growl"},
    {"name": "oicsr", "mode": "proximal"},
    {"name": "group_lasso", "mode": "proximal"},
)
"""Non-default regularizers, reported from their hook time alone (no target)."""


# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What one ``prunebench bench`` run measures (``--quick`` shrinks every count)."""

    model: str = "resnet56_cifar"
    batch: int = 128
    steps: int = 3  # training steps per timed repetition
    reps: int = 5  # timed repetitions (after ``warmup``)
    warmup: int = 1
    latency_reps: int = 9
    calib_images: int = 256
    target: float = 0.5
    round_to: int = 8
    device: str = "cpu"
    quick: bool = False
    profile: bool = True

    @classmethod
    def quick_config(cls, device: str, profile: bool) -> BenchConfig:
        return cls(model="resnet8_cifar", batch=16, steps=2, reps=2, warmup=1, latency_reps=2, calib_images=32,
                   device=device, quick=True, profile=profile)  # fmt: skip


# -- timing helpers --------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of every function, ``reps`` rounds after ``warmup`` untimed rounds.

    Each round calls every function once, in an order rotated from round to round, so that a load
    change on a shared machine falls on all of them rather than on whichever ran last.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> float:
    """Median absolute deviation / median of repeated timings of the same work: 0 on a quiet machine,
    and robust to the odd outlier (a page fault, a timer interrupt) that max - min would report."""
    if not xs:
        return float("nan")
    mid = median(xs)
    return median([abs(x - mid) for x in xs]) / mid


NOISY_SPREAD = 0.10
"""Above this spread of a baseline's repetitions (or a noise floor this far from 1) a run is flagged noisy.

On the idle development VM (2 vCPUs) the spreads were 0.01-0.06 (host neighbours); with one other job
on the machine they were 0.2-0.6. The figures are medians of paired ratios over 9-15 rounds, whose
uncertainty is well below the spread of single timings."""


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``: each round's two timings saw the same machine load."""
    return median([a / b for a, b in zip(num, den)])


@contextlib.contextmanager
def _stderr_to_null() -> Iterator[None]:
    """The progress bar stays enabled (its cost is part of the loop) but writes nowhere."""
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield


# -- machine description ---------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, core count, torch threads and version, GPU name, and the load average (noise)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    with contextlib.suppress(OSError):
        info["load_avg_start"] = round(os.getloadavg()[0], 2)
    return info


def report_name(device: torch.device) -> str:
    """``cpu``, or the GPU model as a file-name slug (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# -- the bench -------------------------------------------------------------------------------------


@dataclass
class Results:
    """Figures as they are measured; :func:`build_report` turns them into the JSON report."""

    figures: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)


class Bench:
    """The shared set-up (data, models, schedule) and one method per figure."""

    def __init__(self, cfg: BenchConfig, say: Callable[[str], None] = print) -> None:
        from prunebench.data import CIFAR10_MEAN, CIFAR10_STD, DataModule, TensorSplit, synthetic_images
        from prunebench.recipe import Schedule, TrainOptions
        from prunebench.train import resolve_device

        self.cfg = cfg
        self.say = say
        self.device = resolve_device(cfg.device)
        n = cfg.batch * cfg.steps
        x, y = synthetic_images(n + cfg.calib_images, 10, 32, seed=0)
        train = TensorSplit(x[:n], y[:n], torch.arange(n))
        empty = TensorSplit(x[:0], y[:0], torch.arange(0))
        self.data = DataModule(
            name="synthetic", train=train.to(self.device), val=empty.to(self.device), test=empty.to(self.device),
            num_classes=10, in_chans=3, image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD, device=self.device,
            augment=True, batch_size=cfg.batch,
        )  # fmt: skip
        self.calib_images = self.data.normalize(x[n:].to(self.device))
        self.sched = Schedule(epochs=1, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
        self.opts = TrainOptions(device=str(self.device))
        self.example = torch.zeros(1, 3, 32, 32, device=self.device)
        self.generator = torch.Generator().manual_seed(0)
        self.results = Results()
        self.results.details["noise"] = {}
        self.machine = machine_info(self.device)  # the load average before the bench adds its own
        self._step_s: float | None = None
        self.dense: nn.Module | None = None  # set by prune_all, with the pruned copies
        self.pruned: dict[str, nn.Module] = {}
        self.seconds = 0.0  # wall time of the whole run (set when it ends)

    # -- set-up helpers ----------------------------------------------------------------------------
    def new_model(self) -> nn.Module:
        """The bench model, freshly initialized with a fixed seed, on the device."""
        from prunebench.models import create_model
        from prunebench.recipe import ModelConfig
        from prunebench.train import prepare_model

        torch.manual_seed(0)
        model = create_model(ModelConfig(name=self.cfg.model), num_classes=10)
        return prepare_model(model, self.device, self.opts)

    def epoch(self, _epoch: int = 0) -> Any:
        """One epoch of augmented training batches from the data module (``steps`` batches)."""
        return self.data.train_batches(self.cfg.batch, self.generator)

    def plain_batches(self) -> list[tuple[Tensor, Tensor]]:
        """The same images, normalized once, un-augmented: what a minimal loop would iterate over."""
        imgs, labels = self.data.train.images, self.data.train.labels
        return [(self.data.normalize(imgs[i : i + self.cfg.batch]), labels[i : i + self.cfg.batch])
                for i in range(0, len(labels), self.cfg.batch)]  # fmt: skip

    def hand_loop(self, model: nn.Module) -> Callable[[], None]:
        """A minimal PyTorch training loop (same precision and memory format as prunebench's on the device)."""
        from prunebench.train import make_optimizer

        opt = make_optimizer(model, self.sched)
        loss_fn = nn.CrossEntropyLoss()
        batches = self.plain_batches()
        cuda = self.device.type == "cuda"
        if cuda and self.opts.channels_last:
            batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]

        def run() -> None:
            model.train()
            for x, y in batches:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda and self.opts.amp):
                    loss = loss_fn(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return run

    def pb_loop(
        self, model: nn.Module, method: Any = None, progress: bool = True, steps: int | None = None
    ) -> Callable[[], None]:
        """One epoch of prunebench's :func:`~prunebench.train.train`: ``steps`` steps (default: all of them)."""
        from prunebench.data import Batches
        from prunebench.train import train

        def batches(epoch: int) -> Any:
            full = self.epoch(epoch)
            if steps is None:
                return full
            return Batches(min(steps, len(full)), lambda: itertools.islice(iter(full), steps))

        def run() -> None:
            with _stderr_to_null():
                train(model, batches, self.sched, method=method, opts=self.opts, desc="bench", quiet=not progress)

        return run

    def time(self, fns: dict[str, Callable[[], object]], reps: int | None = None) -> dict[str, list[float]]:
        return interleaved(fns, reps or self.cfg.reps, self.cfg.warmup, self.device)

    # -- 1. loop efficiency ------------------------------------------------------------------------
    def loop_efficiency(self) -> float:
        images = self.cfg.batch * self.cfg.steps
        fns = {"hand": self.hand_loop(self.new_model()), "prunebench": self.pb_loop(self.new_model())}
        t = self.time(fns, 2 * self.cfg.reps)  # the figure with the tightest bound gets more rounds
        hand, pb = median(t["hand"]), median(t["prunebench"])
        self._step_s = hand / self.cfg.steps
        ratio = paired_ratio(t["hand"], t["prunebench"])
        self.results.figures["loop_efficiency"] = ratio
        self.results.details["noise"]["loop_spread"] = spread(t["hand"])
        self.results.details["loop"] = {
            "hand_images_per_s": images / hand,
            "prunebench_images_per_s": images / pb,
            "step_ms": 1e3 * self._step_s,
            "hand_s": t["hand"],
            "prunebench_s": t["prunebench"],
        }
        return ratio

    # -- 2. regularization overhead ----------------------------------------------------------------
    def reg_overhead(self) -> dict[str, float]:
        """Per method: (plain step + the method's hooks) / plain step, on groups of ``internal`` scope.

        Two measurements. ``reg_overhead`` adds the hooks timed alone (penalty, its backward,
        after_backward, after_step: ``hook_ms``, many repetitions) to the plain step; it is precise
        even when the hooks cost far less than the run-to-run noise of a whole step. ``reg_overhead_step``
        is the end-to-end check: one-step epochs of :func:`train` with the hooks against the same without,
        interleaved, the median over rounds of the paired ratio. Methods without hooks are trained with
        ``method=None`` by the pipeline, so their step *is* the plain step (overhead 1); their end-to-end
        entry is a second plain measurement against the first: the noise floor. The non-default variants
        (:data:`REG_VARIANTS`) are reported from the hook timing only.
        """
        from prunebench.groups import build_groups
        from prunebench.recipe import method_label
        from prunebench.registry import available_methods, build_method

        model = self.new_model()
        _, groups = build_groups(model, self.example, scope="internal")
        methods = {}
        for spec in [*({"name": n} for n in available_methods()), *REG_VARIANTS]:
            m = build_method(spec)
            m.attach(model, groups)
            methods[method_label(spec)] = m
        hooked = [k for k, m in methods.items() if type(m).has_sparsity_training() and "(" not in k]
        fns: dict[str, Callable[[], object]] = {"plain": self.pb_loop(model, progress=False, steps=1)}
        fns.update({k: self.pb_loop(model, methods[k], progress=False, steps=1) for k in hooked})
        fns["plain (again)"] = self.pb_loop(model, progress=False, steps=1)
        t = self.time(fns, self.cfg.reps * self.cfg.steps)
        step_ms = 1e3 * median(t["plain"])
        floor = paired_ratio(t["plain (again)"], t["plain"])
        self.results.details["noise"]["reg_floor_minus_1"] = floor - 1
        hook_ms = {k: 1e3 * self._hook_seconds(m, model) for k, m in methods.items()}
        f = self.results.figures
        f["reg_overhead"] = {k: 1 + hook_ms[k] / step_ms for k in methods if "(" not in k}
        f["reg_overhead_step"] = {k: paired_ratio(t[k], t["plain"]) if k in t else floor for k in f["reg_overhead"]}
        f["reg_overhead_variants"] = {k: 1 + hook_ms[k] / step_ms for k in methods if "(" in k}
        self.results.details["reg"] = {
            "plain_step_ms": step_ms,
            "noise_floor": floor,
            "groups": len(groups),
            "measured": hooked,
            "hook_ms": hook_ms,
            "hook_fraction": {k: v / step_ms for k, v in hook_ms.items()},
        }
        return f["reg_overhead"]

    def _hook_seconds(self, method: Any, model: nn.Module) -> float:
        """Seconds per step of the method's hooks alone (median of 20 after 3 warm-up calls); 0 without hooks."""
        if not type(method).has_sparsity_training():
            return 0.0
        return median(interleaved({"hooks": self._hooks_call(method, model)}, 20, 3, self.device)["hooks"])

    def _hooks_call(self, method: Any, model: nn.Module) -> Callable[[], None]:
        """One step's worth of the method's hooks: penalty, its backward, after_backward, after_step."""
        params = [p for p in model.parameters() if p.requires_grad]

        def hooks() -> None:
            pen = method.penalty()
            if pen is not None:
                pen.backward()
            method.after_backward()
            method.after_step(self.sched.lr)
            for p in params:
                p.grad = None

        return hooks

    # -- 3. data headroom --------------------------------------------------------------------------
    def data_headroom(self) -> float:
        """Batches/s of the augmentation pipeline (an epoch of ``train_batches``, every batch made) over
        batches/s of the bare training step (the hand loop of item 1)."""
        if self._step_s is None:
            self.loop_efficiency()
        assert self._step_s is not None

        def one_epoch() -> None:
            for x, _ in self.epoch():
                x.sum()  # touch the batch (on CUDA, the kernels queue; the timer syncs)

        reps = max(self.cfg.reps, 10)
        per_epoch = median(self.time({"data": one_epoch}, reps)["data"])
        batches_per_s = self.cfg.steps / per_epoch
        ratio = batches_per_s * self._step_s
        self.results.figures["data_headroom"] = ratio
        self.results.details["data"] = {"batches_per_s": batches_per_s, "step_batches_per_s": 1 / self._step_s}
        return ratio

    # -- 4 and 5. pruning: speedup and engine cost -------------------------------------------------
    def prune_all(self) -> dict[str, dict[str, Any]]:
        """Prune a copy of the dense (untrained) model with every method, without and with ``round_to``.

        Scores come from the untrained model (cheap, and speed depends on the widths, not on accuracy);
        at initialization every BN gamma is 1, so slimming's ranking is all ties, broken by group order.
        """
        from prunebench.measure import count_macs
        from prunebench.method import Calibration
        from prunebench.recipe import PruneConfig
        from prunebench.registry import available_methods, build_method

        cfg = PruneConfig()
        dense = self.new_model().eval()
        self.dense = dense
        dense_macs = count_macs(dense, self.example).macs
        self.pruned = {}
        out: dict[str, dict[str, Any]] = {}
        self._prune(dense, build_method({"name": "l1"}), None, None, cfg)  # warm-up: imports, tracer caches
        for name, cls in available_methods().items():
            for rt in (None, self.cfg.round_to):
                label = name if rt is None else f"{name}+round{rt}"
                calib = None
                if cls.uniform:
                    calib_model = copy.deepcopy(dense)
                    calib = Calibration(calib_model, list(self.calib_images.split(512)))
                torch.manual_seed(0)
                model, res = self._prune(dense, build_method({"name": name}), calib, rt, cfg)
                self.pruned[label] = model
                out[label] = {"seconds": res.seconds, "timings": res.timings, "macs": res.macs_after,
                              "macs_ratio": dense_macs / res.macs_after,
                              "macs_reduction": res.macs_reduction, "uniform": cls.uniform,
                              "widths": _widths(model)}  # fmt: skip
        self.results.details["prune"] = out
        return out

    def pruned_models(self) -> tuple[nn.Module, dict[str, nn.Module]]:
        """The dense model and its pruned copies (pruning them first if :meth:`prune_all` has not run)."""
        if self.dense is None:
            self.prune_all()
        assert self.dense is not None
        return self.dense, self.pruned

    def _prune(self, dense: nn.Module, method: Any, calib: Any, round_to: int | None, cfg: Any) -> tuple[nn.Module, Any]:
        from prunebench.engine import prune_to_target

        model = calib.model if calib is not None else copy.deepcopy(dense)
        res = prune_to_target(model, method, self.cfg.target, self.example, scope=cfg.scope,
                              max_layer_ratio=cfg.max_layer_ratio, calib=calib, round_to=round_to)  # fmt: skip
        return model, res

    def speedup(self) -> dict[str, float]:
        """Latency of every pruned model against the dense one at batch 1 and the bench batch.

        All models run in every round (interleaved); a speedup is the median over rounds of the paired
        ratio dense / pruned. Latencies in the details are plain medians.
        """
        from prunebench.measure import latency_input, latency_ready

        dense, pruned = self.pruned_models()
        lat: dict[int, dict[str, float]] = {}
        speed: dict[int, dict[str, float]] = {}
        nets = {k: latency_ready(net, self.device) for k, net in {"dense": dense, **pruned}.items()}
        for bs in (1, self.cfg.batch):
            x = latency_input(bs, (3, 32, 32), self.device)
            fns = {k: _forward(net, x) for k, net in nets.items()}
            t = interleaved(fns, self.cfg.latency_reps * (4 if bs == 1 else 1), 2 * self.cfg.warmup, self.device)
            lat[bs] = {k: 1e3 * median(v) for k, v in t.items()}
            if bs == self.cfg.batch:
                self.results.details["noise"]["latency_spread"] = spread(t["dense"])
            speed[bs] = {k: paired_ratio(t["dense"], t[k]) for k in pruned}
        prune = self.results.details["prune"]
        big = self.cfg.batch
        f = self.results.figures
        for suffix, keys in (("", [k for k in pruned if "+round" not in k]),
                             ("_rounded", [k for k in pruned if "+round" in k])):  # fmt: skip
            f["speedup" + suffix] = {k: speed[big][k] for k in keys}
            f["speedup_b1" + suffix] = {k: speed[1][k] for k in keys}
            f["macs_ratio" + suffix] = {k: prune[k]["macs_ratio"] for k in keys}
            f["speedup_efficiency" + suffix] = {k: speed[big][k] / prune[k]["macs_ratio"] for k in keys}
        self.results.details["latency_ms"] = {str(bs): v for bs, v in lat.items()}
        return f["speedup_efficiency"]

    def engine_costs(self) -> dict[str, float]:
        """engine_s (median over the score-based methods' prune calls), thinet_s, macs_count_s."""
        from prunebench.measure import count_macs

        dense, _ = self.pruned_models()
        prune = self.results.details["prune"]
        scored = [v["seconds"] for k, v in prune.items() if not v["uniform"] and "+round" not in k]
        thinet = [v["timings"].get("plan", float("nan")) for k, v in prune.items() if v["uniform"] and "+round" not in k]
        counts = self.time({"count": lambda: count_macs(dense, self.example)}, self.cfg.reps)["count"]
        f = self.results.figures
        f["engine_s"] = median(scored)
        f["thinet_s"] = max(thinet) if thinet else float("nan")
        f["macs_count_s"] = median(counts)
        self.results.details["engine"] = {"engine_s_max": max(scored), "engine_s_each": scored}
        return {k: f[k] for k in ("engine_s", "thinet_s", "macs_count_s")}

    # -- profiles of missed targets ----------------------------------------------------------------
    def profile_misses(self, checks: list[dict[str, Any]]) -> None:
        """Attach a profile to every missed figure (at most one per kind of figure)."""
        done: set[str] = set()
        for c in checks:
            kind = c["figure"]
            if c["pass"] or kind in done:
                continue
            done.add(kind)
            key = c.get("key")
            self.say(f"profiling {c['name']} (missed)")
            self.results.profiles[c["name"]] = self._profile(kind, key)

    def _profile(self, kind: str, key: str | None) -> str:
        """A profile explaining one missed figure (``key``: the method, where the figure has one)."""
        if kind == "loop_efficiency":
            return ("prunebench train():\n" + _op_table(self.pb_loop(self.new_model()))
                    + "\nhand-written loop:\n" + _op_table(self.hand_loop(self.new_model())))  # fmt: skip
        if kind == "reg_overhead":
            return self._profile_hooks(key or "oicsr")
        if kind == "data_headroom":
            return _op_table(lambda: [x.sum() for x, _ in self.epoch()])
        if kind in ("speedup_efficiency", "speedup_efficiency_rounded"):
            return self._profile_forward(key or "")
        if kind in ("engine_s", "thinet_s", "macs_count_s"):
            return self._profile_engine(kind)
        return ""

    def _profile_hooks(self, name: str) -> str:
        from prunebench.groups import build_groups
        from prunebench.registry import build_method

        model = self.new_model()
        _, groups = build_groups(model, self.example, scope="internal")
        method = build_method({"name": name})
        method.attach(model, groups)
        return f"{name}'s hooks alone (one step):\n" + _op_table(self._hooks_call(method, model))

    def _profile_forward(self, key: str) -> str:
        from prunebench.measure import latency_input, latency_ready

        x = latency_input(self.cfg.batch, (3, 32, 32), self.device)
        dense, pruned = self.pruned_models()
        parts, split = [], []
        for label, m in (("dense", dense), (key, pruned[key])):
            net = latency_ready(m, self.device)
            table, conv_ms, total_ms = _op_profile(_forward(net, x), rows=8)
            split.append((conv_ms, total_ms))
            parts.append(f"{label} forward, batch {self.cfg.batch}, torch.profiler:\n{table}")
            if self.device.type == "cpu":
                parts.append(f"{label} forward, oneDNN verbose:\n" + _onednn_summary(_forward(net, x)))
        macs_ratio = self.results.details["prune"][key]["macs_ratio"]
        return "\n\n".join(["diagnosis: " + speed_diagnosis(split[0], split[1], macs_ratio), *parts])

    def _profile_engine(self, kind: str) -> str:
        from prunebench.measure import count_macs
        from prunebench.method import Calibration
        from prunebench.recipe import PruneConfig
        from prunebench.registry import build_method

        dense, _ = self.pruned_models()
        if kind == "macs_count_s":
            return _py_profile(lambda: count_macs(dense, self.example))
        name = "thinet" if kind == "thinet_s" else "oicsr"
        calib = Calibration(copy.deepcopy(dense), list(self.calib_images.split(512))) if kind == "thinet_s" else None
        return _py_profile(lambda: self._prune(dense, build_method({"name": name}), calib, None, PruneConfig()))


def _forward(net: nn.Module, x: Tensor) -> Callable[[], None]:
    """One forward of ``net`` as :func:`prunebench.measure.measure_latency` times it (eval, inference
    mode, bf16 autocast on CUDA); pass a model from :func:`~prunebench.measure.latency_ready`."""
    net.eval()
    cuda = x.device.type == "cuda"

    def run() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
            net(x)

    return run


def _widths(model: nn.Module) -> list[int]:
    """Out-channels of every conv, in module order (what decides the kernels' speed)."""
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's native library logs start/stop lines there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _op_table(fn: Callable[[], object], shapes: bool = False, rows: int = 14) -> str:
    """torch.profiler's operator table (self CPU time) for one call of ``fn``."""
    return _op_profile(fn, shapes, rows)[0]


_CONV_OPS = ("aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_slow_conv2d_forward", "aten::thnn_conv2d")


def _op_profile(fn: Callable[[], object], shapes: bool = False, rows: int = 14) -> tuple[str, float, float]:
    """torch.profiler's operator table for one call of ``fn`` (after a warm call), with the milliseconds
    spent in convolution kernels and in all operators (self time, CPU or CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    with _native_stderr_silenced(), profile(activities=acts, record_shapes=shapes) as prof:
        fn()
    events = prof.key_averages(group_by_input_shape=shapes)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    self_us = [(e.key, getattr(e, "self_device_time_total" if cuda else "self_cpu_time_total", 0.0)) for e in events]
    conv_ms = sum(us for k, us in self_us if k in _CONV_OPS or "conv" in k.lower()) / 1e3 if cuda else \
        sum(us for k, us in self_us if k in _CONV_OPS) / 1e3
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


def _onednn_summary(fn: Callable[[], object], rows: int = 8) -> str:
    """oneDNN's verbose log of one call of ``fn``: milliseconds per primitive kind and implementation
    (layout reorders show up here, not in torch.profiler), convolution throughput split by whether the
    channel counts are multiples of 8 (the AVX2 vector width), and the slowest convolutions."""
    lines = _onednn_log(fn)
    if not lines:
        return "(oneDNN ran no primitive)"
    totals: dict[tuple[str, str], list[float]] = {}
    for f in lines:
        totals.setdefault((f[5], f[6]), []).append(float(f[-1]))
    out = [f"{'primitive':<14} {'implementation':<22} {'calls':>5} {'ms':>9}"]
    for (kind, impl), ts in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        out.append(f"{kind:<14} {impl:<22} {len(ts):>5} {sum(ts):>9.2f}")
    convs = []  # (fields, macs, channels multiples of 8, ms)
    for f in lines:
        macs, aligned = _conv_macs(f[-2]) if f[5] == "convolution" else (0, False)
        if macs:
            convs.append((f, macs, aligned, float(f[-1])))
    for want in (True, False):
        sel = [(macs, ms) for _, macs, aligned, ms in convs if aligned == want]
        if sel:
            gmacs, ms = sum(m for m, _ in sel) / 1e9, sum(t for _, t in sel)
            what = "in and out channels multiples of 8" if want else "a channel count not a multiple of 8"
            out.append(f"convolutions with {what}: {len(sel)} calls, {gmacs:.2f} GMACs in {ms:.1f} ms = "
                       f"{gmacs / max(ms, 1e-9) * 1e3:.1f} GMAC/s")  # fmt: skip
    out.append("slowest convolutions:")
    for f, macs, _, ms in sorted(convs, key=lambda c: -c[3])[:rows]:
        out.append(f"  {ms:8.2f} ms  {macs / 1e9 / max(ms, 1e-9) * 1e3:6.1f} GMAC/s  {f[6]:<18} {f[-2].split('_ih')[0]}")
    return "\n".join(out)


def _onednn_log(fn: Callable[[], object]) -> list[list[str]]:
    """The comma-separated fields of every primitive oneDNN executed during one call of ``fn`` (after a warm
    call: primitive creation is not what we want to see). oneDNN prints with C stdio to file descriptor 1."""
    import ctypes
    import tempfile

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


_CONV_DESC = re.compile(r"mb(\d+)(?:_g(\d+))?_ic(\d+)oc(\d+)(?:_id\d+od\d+)?_ih(\d+)oh(\d+)kh(\d+).*?_iw(\d+)ow(\d+)kw(\d+)")


def _conv_macs(desc: str) -> tuple[int, bool]:
    """Multiply-adds of a oneDNN convolution problem (``mb128_ic16oc9_ih32oh32kh3..._iw32ow32kw3...``) and
    whether its channel counts are multiples of 8; ``(0, False)`` when the text does not parse."""
    m = _CONV_DESC.search(desc)
    if m is None:
        return 0, False
    mb, g, ic, oc, _ih, oh, kh, _iw, ow, kw = (int(v) if v else 1 for v in m.groups())
    return mb * oc * (ic // g) * oh * ow * kh * kw, ic % 8 == 0 and oc % 8 == 0


def _py_profile(fn: Callable[[], object], rows: int = 18) -> str:
    """cProfile's cumulative-time table for one call of ``fn`` (Python-level work: tracing, graph walks)."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("cumulative").print_stats(rows)
    return buf.getvalue().strip()


# -- targets and the report ------------------------------------------------------------------------


def check_targets(figures: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """One row per target: figure, key (method), value, bound, pass."""
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: float, key: str | None = None, name: str | None = None) -> None:
        t = TARGETS[figure.replace("_rounded", "")]
        label = name or (f"{figure}[{key}]" if key else figure)
        rows.append({"name": label, "figure": figure, "key": key, "value": value, "target": t.text,
                     "pass": t.met(value)})  # fmt: skip

    add("loop_efficiency", figures["loop_efficiency"])
    for m in TARGET_METHODS:
        add("reg_overhead", figures["reg_overhead"][m], m)
    if device.type == "cpu":  # the headroom target is a CPU one (a GPU step is far faster)
        add("data_headroom", figures["data_headroom"])
    for k, v in figures["speedup_efficiency"].items():
        add("speedup_efficiency", v, k)
    for k, v in figures["speedup_efficiency_rounded"].items():
        add("speedup_efficiency_rounded", v, k)
    for f in ("engine_s", "thinet_s", "macs_count_s"):
        add(f, figures[f])
    return rows


def build_report(bench: Bench, argv: list[str], seconds: float) -> dict[str, Any]:
    """The JSON report: the figures at the top level, then targets, machine, config and details."""
    r = bench.results
    checks = check_targets(r.figures, bench.device)
    machine = dict(bench.machine)
    with contextlib.suppress(OSError):
        machine["load_avg_end"] = round(os.getloadavg()[0], 2)
    cfg = bench.cfg
    return {
        **r.figures,
        "machine": machine,
        "targets": {name: {"bound": t.text, "why": t.why} for name, t in TARGETS.items()},
        "checks": checks,
        "pass": {c["name"]: c["pass"] for c in checks},
        "all_pass": all(c["pass"] for c in checks),
        "noisy": is_noisy(r.details["noise"]),
        "config": {**cfg.__dict__, "command": "prunebench " + " ".join(argv), "seconds": round(seconds, 1)},
        "details": r.details,
        "profiles": r.profiles,
    }


def is_noisy(noise: dict[str, float]) -> bool:
    """Whether the repetitions disagree enough that ratios near a bound are not to be trusted."""
    return any(not math.isfinite(v) or abs(v) > NOISY_SPREAD for v in noise.values())


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def render_markdown(rep: dict[str, Any]) -> str:
    """The human report: targets first, then every figure's table, the machine, and profiles of misses."""
    m, cfg, det = rep["machine"], rep["config"], rep["details"]
    out = [
        f"# prunebench bench: {cfg['model']} on {m['gpu'] or m['cpu']}",
        "",
        f"Generated by `{cfg['command']}` in {cfg['seconds']} s. Every figure is a ratio of timings taken in the "
        f"same run, a median over rounds after {cfg['warmup']} warm-up round(s) (loop: {2 * cfg['reps']} rounds of "
        f"{cfg['steps']}-step epochs; regularization: {cfg['reps'] * cfg['steps']} rounds of one-step epochs; latency: "
        f"{cfg['latency_reps']} rounds, x4 at batch 1), with the compared variants interleaved in every round. "
        "`prunebench bench --help` explains each figure.",
        "",
        "## Targets",
        "",
        "| figure | value | target | met |",
        "|---|---:|---:|:---:|",
    ]
    out += [f"| {c['name']} | {_fmt(c['value'])} | {c['target']} | {'yes' if c['pass'] else '**no**'} |" for c in rep["checks"]]
    noise = ", ".join(f"{k} {v:.3f}" for k, v in det["noise"].items())
    load = f"load average {m.get('load_avg_start')} before, {m.get('load_avg_end')} after"
    if rep["noisy"]:
        out += ["", f"**Noisy run** ({noise}; {load}): repetitions of identical work typically disagreed by more "
                f"than {NOISY_SPREAD:.0%} (median absolute deviation): other processes, or the neighbours of a "
                "virtual machine, were using the CPU. Ratios close to their bounds are not conclusive; rerun on "
                "a quiet machine."]  # fmt: skip
    else:
        out += ["", f"Measurement noise: {noise} (median absolute deviation / median of repeated identical work, "
                f"and the no-hooks noise floor of item 2 minus 1; {load})."]
    loop = det["loop"]
    out += [
        "",
        "## 1. Loop efficiency",
        "",
        f"prunebench `train()` (augmentation, progress bar, metric accumulation): {loop['prunebench_images_per_s']:.1f} "
        f"images/s; minimal hand-written loop on pre-normalized tensors: {loop['hand_images_per_s']:.1f} images/s; "
        f"ratio **{rep['loop_efficiency']:.3f}**. Batch {cfg['batch']}, {cfg['steps']} steps per repetition, "
        "SGD with momentum and weight decay.",
        "",
        "## 2. Regularization overhead (step with the method's hooks / plain step)",
        "",
        f"Plain step {det['reg']['plain_step_ms']:.1f} ms; {det['reg']['groups']} prunable groups (scope internal). "
        "`overhead` = (plain step + hooks) / plain step, with the hooks (penalty, its backward, after_backward, "
        "after_step) timed alone over many repetitions: precise however small they are. `step ratio` is the "
        "end-to-end check, one-step epochs of `train()` with the hooks / without, interleaved, median over "
        "rounds; methods without hooks are trained with `method=None` by the pipeline (their overhead is 1), "
        "and their step ratio is a second plain measurement against the first: the noise floor "
        f"(**{det['reg']['noise_floor']:.3f}** here). Step ratios within the noise floor's distance from 1 are noise.",
        "",
        "| method | overhead | step ratio | hook ms | hooks / step |",
        "|---|---:|---:|---:|---:|",
    ]
    reg = det["reg"]
    for k, v in rep["reg_overhead"].items():
        how = "" if k in reg["measured"] else " (no hooks)"
        out.append(f"| {k}{how} | {v:.4f} | {rep['reg_overhead_step'][k]:.3f} | {reg['hook_ms'][k]:.2f} | "
                   f"{reg['hook_fraction'][k]:.4f} |")  # fmt: skip
    for k, v in rep["reg_overhead_variants"].items():
        out.append(f"| {k} | {v:.4f} | | {reg['hook_ms'][k]:.2f} | {reg['hook_fraction'][k]:.4f} |")
    out += [
        "",
        "## 3. Data pipeline headroom",
        "",
        f"Augmentation pipeline (random crop + flip + normalize, batched on the device): "
        f"{det['data']['batches_per_s']:.1f} batches/s; the training step consumes "
        f"{det['data']['step_batches_per_s']:.2f} batches/s; headroom **{rep['data_headroom']:.1f}**.",
        "",
        f"## 4. Real speedup at {int(100 * cfg['target'])}% fewer MACs",
        "",
        "Pruned with each method's scores on the dense, *untrained* model (speed depends on the channel widths "
        "left, not on accuracy; at initialization every BN gamma is 1, so slimming's ranking is all ties, broken "
        f"by group order). Eval mode, inference mode, median of {cfg['latency_reps']} runs (x4 at batch 1). "
        f"`+round{cfg['round_to']}` uses the engine's `round_to={cfg['round_to']}` (recipe key `prune.round_to`).",
        "",
        f"| method | MACs ratio | speedup b1 | speedup b{cfg['batch']} | efficiency | ms b1 | ms b{cfg['batch']} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lat1, latb = det["latency_ms"]["1"], det["latency_ms"][str(cfg["batch"])]
    out.append(f"| dense | 1.000 | 1.000 | 1.000 | | {lat1['dense']:.2f} | {latb['dense']:.1f} |")
    rows = [(k, rep["macs_ratio"][k], rep["speedup_b1"][k], rep["speedup"][k], rep["speedup_efficiency"][k])
            for k in rep["speedup"]]  # fmt: skip
    rows += [(k, rep["macs_ratio_rounded"][k], rep["speedup_b1_rounded"][k], rep["speedup_rounded"][k],
              rep["speedup_efficiency_rounded"][k]) for k in rep["speedup_rounded"]]  # fmt: skip
    for k, mr, s1, sb, eff in sorted(rows):
        out.append(f"| {k} | {mr:.3f} | {s1:.3f} | {sb:.3f} | {eff:.3f} | {lat1[k]:.2f} | {latb[k]:.1f} |")
    eff, eff_r = rep["speedup_efficiency"].values(), rep["speedup_efficiency_rounded"].values()
    if eff and eff_r:
        out += ["", f"Efficiency at batch {cfg['batch']}: {min(eff):.2f}-{max(eff):.2f} with the widths as pruned, "
                f"{min(eff_r):.2f}-{max(eff_r):.2f} with `round_to={cfg['round_to']}`. The profiles of missed targets "
                "(below) split each forward pass into convolutions and other operators and give the convolutions' "
                "throughput by channel alignment."]  # fmt: skip
    out += ["", "Conv output widths after pruning (module order):", ""]
    for k, v in sorted(det["prune"].items()):
        out.append(f"- {k}: {v['widths']}")
    pr = det["prune"]
    out += [
        "",
        "## 5. Engine cost",
        "",
        f"- engine_s **{rep['engine_s']:.2f} s**: one `prune_to_target` call (two fvcore counts, groups, scores, "
        f"plan, cut) to {int(100 * cfg['target'])}% fewer MACs, median over the score-based methods "
        f"(max {det['engine']['engine_s_max']:.2f} s).",
        f"- thinet_s **{rep['thinet_s']:.2f} s**: ThiNet's selection and reconstruction on {cfg['calib_images']} "
        "calibration images (the engine's plan step: one forward pass, greedy selection, least squares).",
        f"- macs_count_s **{rep['macs_count_s']:.3f} s**: one fvcore count.",
        "",
        "| method | total s | " + " | ".join(sorted(next(iter(pr.values()))["timings"])) + " |",
        "|---|---:|" + "---:|" * len(next(iter(pr.values()))["timings"]),
    ]
    for k, v in sorted(pr.items()):
        out.append(f"| {k} | {v['seconds']:.2f} | " + " | ".join(f"{v['timings'][t]:.2f}" for t in sorted(v["timings"])) + " |")
    out += [
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in m.items()),
    ]
    if rep["profiles"]:
        out += ["", "## Profiles of missed targets", ""]
        for name, text in rep["profiles"].items():
            out += [f"### {name}", "", "```", text, "```", ""]
    return "\n".join(out).rstrip() + "\n"


# -- command line ----------------------------------------------------------------------------------

HELP = """\
figures (each a ratio or a time measured in this one process, median of several repetitions):
  loop_efficiency     images/s of prunebench's train() (data pipeline with augmentation, progress bar,
                      metric accumulation) / images/s of a minimal hand-written loop (same model, batch,
                      SGD, in-memory tensors, no augmentation). Target >= 0.95.
  reg_overhead        per method: time per training step with its hooks (penalty, after_backward,
                      after_step on groups of internal scope) / plain step, as (plain step + hooks
                      timed alone) / plain step. Target <= 1.05 for oicsr, group_lasso, slimming.
                      reg_overhead_step is the end-to-end check (train() with / without the hooks);
                      methods without hooks give its noise floor.
  data_headroom       batches/s the in-memory augmentation pipeline delivers / batches/s the training
                      step consumes. Target >= 10 on CPU.
  speedup             per method at the MACs target: dense latency / pruned latency (eval, inference
                      mode, channels_last as in prunebench run) at batch 1 (speedup_b1) and at the
                      bench batch; macs_ratio = dense MACs /
                      pruned MACs; speedup_efficiency = speedup / macs_ratio. Target >= 0.8. Shown also
                      with the engine's round_to (recipe key prune.round_to).
  engine_s            seconds for one prune_to_target call (build groups, score, select, cut, count).
                      Target <= 3 s.
  thinet_s            seconds of ThiNet's selection and reconstruction (calibration images). <= 60 s.
  macs_count_s        seconds of one fvcore MACs count. Target <= 1 s.

A missed target gets a profile in the Markdown report (torch.profiler operator tables, oneDNN's log
of every convolution on CPU, cProfile for the engine). The report says when the run was noisy.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure the speed of the harness and the real speedup of pruned networks (reports/perf)",
        description="Measure prunebench's own speed and the real speed of pruned networks, against targets; "
        "write <out>/<name>.md and <out>/<name>.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=HELP,
    )
    p.add_argument("--model", default=BenchConfig.model, help="CIFAR model name (default: %(default)s)")
    p.add_argument("--batch", type=int, default=BenchConfig.batch,
                   help="training and latency batch (default: %(default)s)")
    p.add_argument("--steps", type=int, default=BenchConfig.steps,
                   help="training steps per repetition (default: %(default)s)")
    p.add_argument("--reps", type=int, default=BenchConfig.reps,
                   help="timed rounds (loop: twice this; regularization: this x steps one-step rounds) "
                   "(default: %(default)s)")
    p.add_argument("--round-to", type=int, default=BenchConfig.round_to,
                   help="channel multiple for the rounded pruning variant (default: %(default)s)")
    p.add_argument("--out", default="reports/perf", help="output folder (default: %(default)s)")
    p.add_argument("--name", default=None, help="report file name without extension (default: cpu or the GPU model)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model (resnet8_cifar), batch 16, few steps, one thread: a smoke test")
    p.add_argument("--no-profile", action="store_true", help="do not profile missed targets")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from the command line; bad values are a :class:`UserError`."""
    for key in ("batch", "steps", "reps", "round_to"):
        if getattr(args, key) < 1:
            raise UserError(f"bench: --{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.quick:
        return BenchConfig.quick_config(args.device, not args.no_profile)
    return BenchConfig(model=args.model, batch=args.batch, steps=args.steps, reps=args.reps, round_to=args.round_to,
                       device=args.device, profile=not args.no_profile)  # fmt: skip


def command_line(args: argparse.Namespace) -> list[str]:
    """The command that reproduces this run (recorded in the report)."""
    if args.quick:
        return ["bench", "--quick", "--out", str(args.out)]
    argv = ["bench", "--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps), "--reps",
            str(args.reps), "--round-to", str(args.round_to), "--out", str(args.out), "--device", args.device]
    return argv + (["--threads", str(args.threads)] if args.threads is not None else [])


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (``None``: leave torch's choice), then restore the previous count:
    the bench may run inside another process (the test suite) whose later work must not change."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(max(n, 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(args: argparse.Namespace) -> int:
    """Run every figure, write the JSON and Markdown reports, print the targets table.

    ``--quick`` runs single-threaded unless ``--threads`` says otherwise: a tiny model gains nothing from
    a second thread, and one thread keeps the smoke test fast on a machine other jobs share.
    """
    from prunebench.models import list_models

    cfg = config_from_args(args)
    if cfg.model not in list_models("*_cifar"):
        raise UserError(f"bench: --model {cfg.model!r} is not a CIFAR model; see 'prunebench models *_cifar'")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("bench: --device cuda but no CUDA device is available; use --device cpu")
    threads = args.threads if args.threads is not None else (1 if cfg.quick else None)
    with torch_threads(threads):
        bench = _run_all(cfg)
    report = build_report(bench, command_line(args), bench.seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or report_name(bench.device)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out / f"{name}.md").write_text(render_markdown(report))
    for c in report["checks"]:
        print(f"  {c['name']:<44} {_fmt(c['value']):>10}  {c['target']:<8} {'ok' if c['pass'] else 'MISSED'}")
    print(f"wrote {out / f'{name}.md'} and {out / f'{name}.json'}")
    return 0


def _run_all(cfg: BenchConfig) -> Bench:
    """Measure every figure (printing progress), then profile the misses."""
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    bench = Bench(cfg, say)
    say(f"bench {cfg.model}, batch {cfg.batch}, on {bench.device} ({torch.get_num_threads()} threads)")
    load = bench.machine.get("load_avg_start")
    if load is not None and load > 1.0 and bench.device.type == "cpu":
        say(f"warning: load average {load}: other processes share the CPU, the figures will be noisy")
    steps = [("loop efficiency", bench.loop_efficiency), ("data headroom", bench.data_headroom),
             ("regularization overhead", bench.reg_overhead), ("pruning every method", bench.prune_all),
             ("latency of pruned models", bench.speedup), ("engine costs", bench.engine_costs)]  # fmt: skip
    for what, fn in steps:
        say(what)
        fn()
    if cfg.profile:
        bench.profile_misses(check_targets(bench.results.figures, bench.device))
    bench.seconds = time.perf_counter() - t0
    return bench
