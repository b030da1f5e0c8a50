"""Timing that survives a shared machine: interleaved rounds, paired ratios and their spread.

Competing variants (a dense and a pruned model, eager and ONNX Runtime, a step with and without a method's
hooks) run once per round, in an order rotated from round to round, so that a load change on a shared machine
falls on every variant alike; a speedup is the median over rounds of the paired ratios, and its spread says
how far the rounds disagreed. Each call is timed by ``torch.utils.benchmark.Timer``: it keeps the caller's
thread count, synchronizes an accelerator around the call and runs two warm-up calls right before the timed
one. Used by ``prunebench run`` (every cell) and ``prunebench bench``; docs/fairness.md (speed) says why.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

with contextlib.ExitStack() as _quiet:  # importing the benchmark utilities warns about a missing CUDA runtime
    _cpp_log = logging.getLogger("torch.utils.cpp_extension")
    _quiet.callback(_cpp_log.setLevel, _cpp_log.level)
    _cpp_log.setLevel(logging.ERROR)
    from torch.utils.benchmark import Timer

NOISY_SPREAD = 0.10
"""Above this spread of a baseline's repetitions (or a noise floor this far from 1) a bench run is flagged noisy.

A quiet machine shows a few percent; a shared one far more (the spreads of each run are in reports/perf/).
The bench's figures are medians of paired ratios over many rounds, whose uncertainty is well below the spread
of single timings."""

NOISY_SPEEDUP_SPREAD = 0.05
"""Above this spread of its per-round ratios a cell's speedup is shown as noisy by ``prunebench compare``."""


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device | str | None = None
) -> dict[str, list[float]]:
    """Seconds per call of every function, ``reps`` rounds after ``warmup`` untimed rounds.

    Each round times every function once (``Timer.timeit(1)``, which also runs two warm-up calls), in an
    order rotated from round to round. ``device`` is accepted for the callers' symmetry: the Timer
    synchronizes whatever accelerator is present.
    """
    del device
    threads = torch.get_num_threads()
    timers = {name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads) for name, fn in fns.items()}
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            seconds = timers[name].timeit(1).median
            if r >= warmup:
                times[name].append(seconds)
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


def ratios(num: list[float], den: list[float]) -> list[float]:
    """``num[i] / den[i]`` for every round: each round's two timings saw the same machine load."""
    return [a / b for a, b in zip(num, den, strict=True)]


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``."""
    return median(ratios(num, den))


@dataclass(frozen=True)
class Paired:
    """One variant timed against a baseline in the same rounds."""

    ms: float  # median milliseconds per call
    baseline_ms: float  # the baseline's median milliseconds per call
    speedup: float  # median over rounds of baseline / variant
    spread: float  # relative dispersion of those per-round ratios (see :func:`spread`)

    @property
    def noisy(self) -> bool:
        return not math.isfinite(self.spread) or self.spread > NOISY_SPEEDUP_SPREAD


def pair(variant: list[float], baseline: list[float]) -> Paired:
    """``variant`` timed against ``baseline`` in the same rounds of :func:`interleaved`."""
    r = ratios(baseline, variant)
    return Paired(1e3 * median(variant), 1e3 * median(baseline), median(r), spread(r))


def speedup_text(speedup: float, spread: float) -> str:
    """A speedup for people: ``1.85x``, or ``~1.85x noisy`` when its rounds disagreed by more than
    :data:`NOISY_SPEEDUP_SPREAD`; empty when there is none (NaN), unmarked when its spread is unknown."""
    if not math.isfinite(speedup):
        return ""
    if math.isfinite(spread) and spread > NOISY_SPEEDUP_SPREAD:
        return f"~{speedup:.2f}x noisy"
    return f"{speedup:.2f}x"


def is_noisy(noise: dict[str, float]) -> bool:
    """Whether the repetitions disagree enough that ratios near a bound are not to be trusted."""
    return any(not math.isfinite(v) or abs(v) > NOISY_SPREAD for v in noise.values())


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
