"""The timing of prunebench run and bench (prunebench.timing): interleaved rounds through
torch.utils.benchmark.Timer, paired ratios, and a spread that flags a disturbed measurement as noisy."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from prunebench.timing import NOISY_SPEEDUP_SPREAD, interleaved, pair, spread

pytestmark = pytest.mark.unit


def _sleep(seconds: float):
    return lambda: time.sleep(seconds)


def test_interleaved_times_every_function_each_round_after_warmup() -> None:
    calls: list[str] = []
    t = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=2)
    assert len(t["a"]) == len(t["b"]) == 3 and all(x > 0 for x in t["a"] + t["b"])
    # each timing is Timer.timeit(1): two warm-up calls, then the timed one, for 5 rounds
    assert calls.count("a") == calls.count("b") == 15
    assert calls[::3][:4] == ["a", "b", "b", "a"]  # the order rotates from round to round


def test_interleaved_keeps_the_callers_thread_count() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    torch.set_num_threads(1)
    try:
        interleaved({"a": lambda: seen.append(torch.get_num_threads())}, reps=2, warmup=0)
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {1}  # Timer's default would be one thread too: check a second count
    interleaved({"a": lambda: seen.append(torch.get_num_threads())}, reps=1, warmup=0)
    assert seen[-1] == before


def test_paired_speedup_of_a_steady_workload() -> None:
    t = interleaved({"slow": _sleep(0.004), "fast": _sleep(0.002)}, reps=7, warmup=1)
    p = pair(t["fast"], t["slow"])
    assert 1.5 < p.speedup < 2.2 and p.ms < p.baseline_ms
    assert p.spread < 0.5 and math.isfinite(p.spread)


def test_disturbed_rounds_make_the_speedup_noisy() -> None:
    """A neighbour's load that slows every call by a different amount: the per-round ratios disagree. (A
    load that hits fewer than half of the rounds leaves the median ratio right, and the spread small.)"""
    rng = random.Random(0)

    def disturbed() -> None:
        time.sleep(0.002 + rng.uniform(0.0, 0.006))

    t = interleaved({"dense": _sleep(0.004), "pruned": disturbed}, reps=9, warmup=0)
    p = pair(t["pruned"], t["dense"])
    assert p.spread > NOISY_SPEEDUP_SPREAD and p.noisy


def test_spread_is_the_relative_median_absolute_deviation() -> None:
    assert spread([1.0, 1.0, 1.0]) == 0
    assert spread([1.0, 1.0, 3.0, 1.0, 1.0]) == 0  # robust to one outlier
    assert spread([1.0, 1.2, 0.8, 1.1, 0.9]) == pytest.approx(0.1)
    assert math.isnan(spread([]))
