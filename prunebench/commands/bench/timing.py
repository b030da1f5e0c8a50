"""Timing for ``prunebench bench``: interleaved rounds, paired ratios, the noise flag, the thread count.

Competing variants run once per round, in an order rotated from round to round, so that a load change on a
shared machine falls on every variant alike; a figure is the median over rounds of the paired ratios. A round
is timed with ``time.perf_counter`` between device syncs rather than with ``torch.utils.benchmark.Timer``,
whose ``timeit`` adds warm-up calls of its own and sets the thread count (one by default): both would break
the one-call-per-round pairing and change what is measured. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch

NOISY_SPREAD = 0.10
"""Above this spread of a baseline's repetitions (or a noise floor this far from 1) a run is flagged noisy.

A quiet machine shows a few percent; a shared one far more (the spreads of each run are in reports/perf/).
The figures are medians of paired ratios over many rounds, whose uncertainty is well below the spread of
single timings."""


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of every function, ``reps`` rounds after ``warmup`` untimed rounds.

    Each round calls every function once, in an order rotated from round to round, so that a load
    change on a shared machine falls on all of them rather than on whichever ran last.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
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


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``: each round's two timings saw the same machine load."""
    return median([a / b for a, b in zip(num, den)])


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
