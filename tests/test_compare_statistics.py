"""``prunebench compare``'s statistics on hand-made per-seed values (no tracking store): the tests of a
target's lead against scipy, the cases where no statement is possible, and the pairing of 'vs best' by seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from prunebench.commands.compare import statistics
from prunebench.commands.compare.reading import Selection
from prunebench.commands.compare.rendering import display_frame, verdict_lines
from prunebench.commands.compare.report import Comparison, speed_notes
from prunebench.tracking.schema import FINAL_METRICS, OPTIONAL_METRICS

Seeded = dict[str, dict[int, float]]  # method label -> seed -> test top-1


def _cells(values: Seeded, target: float = 0.5) -> pd.DataFrame:
    rows = [
        {"model": "m", "dataset": "d", "method": k, "method_label": k, "target": target, "seed": seed, "test_top1": v}
        for k, vs in values.items()
        for seed, v in vs.items()
    ]
    return pd.DataFrame(rows)


def _seeded(**lists: list[float]) -> Seeded:
    return {k: dict(enumerate(vs)) for k, vs in lists.items()}


def _expected(values: Seeded, test: str | None) -> tuple[float, float]:
    """(t, p) computed here with scipy on the values in %: paired by seed, or Welch's on the values."""
    a, b = values["a"], values["b"]
    if test == "paired t-test":
        seeds = sorted(a)
        res = stats.ttest_rel([a[s] * 100 for s in seeds], [b[s] * 100 for s in seeds])
    else:
        res = stats.ttest_ind([v * 100 for v in a.values()], [v * 100 for v in b.values()], equal_var=False)
    return res.statistic, res.pvalue


@pytest.mark.parametrize(
    ("values", "test", "verdict"),
    [
        (_seeded(a=[0.91, 0.93, 0.92], b=[0.80, 0.81, 0.79]), "paired t-test", "larger than seed noise"),
        (_seeded(a=[0.91, 0.80, 0.95], b=[0.90, 0.82, 0.93]), "paired t-test", "within seed noise"),
        # the values vary a lot between seeds but the per-seed lead hardly: only pairing sees it
        (_seeded(a=[0.91, 0.80, 0.95, 0.70], b=[0.90, 0.79, 0.935, 0.69]), "paired t-test", "larger than seed noise"),
        ({"a": {0: 0.91, 1: 0.80, 2: 0.95}, "b": {0: 0.90, 1: 0.82, 3: 0.93}}, "Welch's t-test", "within seed noise"),
        (
            {"a": {0: 0.91, 1: 0.93, 2: 0.92}, "b": {1: 0.80, 2: 0.81, 3: 0.79, 4: 0.8}},
            "Welch's t-test",
            "larger than seed noise",
        ),
    ],
)
def test_significance_pairs_by_seed_and_matches_scipy(values: Seeded, test: str, verdict: str) -> None:
    row = statistics.significance(_cells(values)).iloc[0]
    assert row["best"] == "a" and row["runner_up"] == "b" and row["test"] == test and verdict in row["verdict"]
    t, p = _expected(values, test)
    assert row["statistic"] == pytest.approx(t) and row["p_value"] == pytest.approx(p)
    assert row["n"] == (len(values["a"]) if test == "paired t-test" else len(values["a"]) + len(values["b"]))
    assert row["n_common"] == len(set(values["a"]) & set(values["b"]))
    mean = {k: np.mean(list(v.values())) * 100 for k, v in values.items()}
    assert row["lead_pp"] == pytest.approx(mean["a"] - mean["b"])


@pytest.mark.parametrize(
    ("values", "verdict"),
    [
        # the same lead on every seed: t = lead / 0, and scipy would print p = 0 (or a tiny p from rounding)
        (_seeded(a=[0.5, 0.6, 0.7], b=[0.25, 0.35, 0.45]), "identical per-seed differences"),
        (_seeded(a=[0.91, 0.93], b=[0.81, 0.83]), "identical per-seed differences"),
        (_seeded(a=[0.5, 0.5], b=[0.25, 0.25]), "identical per-seed differences"),
        ({"a": {0: 0.5, 1: 0.5}, "b": {0: 0.25, 2: 0.25}}, "no seed-to-seed variation on either side"),
        (_seeded(a=[0.9], b=[0.8]), "n < 2 common seeds: no significance statement"),
        ({"a": {0: 0.9}, "b": {0: 0.8, 1: 0.7}}, "n < 2 on one side: no significance statement"),
        (_seeded(a=[0.9, 0.8]), "only one method"),
    ],
)
def test_significance_makes_no_statement_without_noise_estimate(values: Seeded, verdict: str) -> None:
    row = statistics.significance(_cells(values)).iloc[0]
    assert row["best"] == "a" and verdict in row["verdict"]
    assert np.isnan(row["p_value"]) and np.isnan(row["statistic"])
    comp = Comparison(
        Selection("sqlite:///x.db", "e", "1"),
        _cells(values).assign(stage_epochs=None),
        pd.DataFrame({"model": ["m"], "dataset": ["d"]}),
        pd.DataFrame([row]),
        [],
    )
    assert "p = " not in "\n".join(verdict_lines(comp))


def test_vs_best_pairs_common_seeds() -> None:
    """With different seed sets, 'vs best' averages the per-seed differences over the common seeds only."""
    values = {"a": {0: 0.91, 1: 0.93, 2: 0.92}, "b": {1: 0.80, 2: 0.83, 3: 0.5}}
    cells = _cells(values).assign(**{k: np.nan for k in (*FINAL_METRICS, *OPTIONAL_METRICS) if k != "test_top1"})
    table = statistics.aggregate(cells)
    b = table[table["method_label"] == "b"].iloc[0]
    diff = np.array([0.80 - 0.93, 0.83 - 0.92]) * 100
    assert b["vs_best_pp"] == pytest.approx(diff.mean()) and b["vs_best_pp_std"] == pytest.approx(diff.std(ddof=1))
    assert b["vs_best_n"] == 2 and pd.isna(b["vs_control_pp"])  # no dense controls given


def _speed_cells() -> pd.DataFrame:
    """Two methods over two seeds: ``quiet`` timed with a tight spread, ``busy`` with one disturbed seed and
    one cell that did not export to ONNX."""
    cells = _cells(_seeded(quiet=[0.9, 0.91], busy=[0.8, 0.82])).assign(
        **{k: np.nan for k in (*FINAL_METRICS, *OPTIONAL_METRICS) if k != "test_top1"}
    )
    cells = cells.assign(
        dense_test_top1=0.92,
        macs=1e6,
        macs_dense=2e6,
        latency_ms_batch=10.0,
        dense_latency_ms_batch=18.0,
        speedup=1.8,
        speedup_spread=[0.01, 0.02, 0.03, 0.3],
        onnx_latency_ms_batch=[5.0, 5.0, 6.0, np.nan],
        onnx_speedup=[1.5, 1.5, 1.4, np.nan],
        onnx_speedup_spread=0.01,
        onnx_error=[None, None, None, "ONNX export failed; dynamo: DispatchError: aten.foo"],
    )
    return cells


def test_a_noisy_speedup_is_marked_and_a_missing_onnx_figure_shows_as_a_gap() -> None:
    cells = _speed_cells()
    table = statistics.aggregate(cells)
    sel = Selection(tracking_uri="sqlite://", experiment="e", experiment_id="1")
    comp = Comparison(sel, cells, table, statistics.significance(cells, 0.05), speed_notes(cells, table))
    shown = display_frame(comp).set_index("method")
    quiet = next(k for k in shown.index if k.startswith("quiet"))
    busy = next(k for k in shown.index if k.startswith("busy"))
    assert shown.loc[quiet, "speedup"] == "1.80x" and shown.loc[quiet, "ONNX speedup"] == "1.50x"
    assert shown.loc[busy, "speedup"] == "~1.80x noisy"  # the worst seed's spread decides
    assert shown.loc[busy, "ONNX speedup"] == "1.40x"  # the seed that exported
    assert any("noisy (busy)" in n for n in comp.notes)
    assert any("1 cell(s) have no ONNX Runtime figures" in n and "aten.foo" in n for n in comp.notes)


def test_a_method_without_any_onnx_figure_shows_n_a() -> None:
    cells = _speed_cells()
    cells.loc[cells["method_label"] == "busy", ["onnx_speedup", "onnx_latency_ms_batch"]] = np.nan
    table = statistics.aggregate(cells)
    sel = Selection(tracking_uri="sqlite://", experiment="e", experiment_id="1")
    comp = Comparison(sel, cells, table, statistics.significance(cells, 0.05), [])
    shown = display_frame(comp).set_index("method")
    busy = next(k for k in shown.index if k.startswith("busy"))
    assert shown.loc[busy, "ONNX speedup"] == "n/a" and shown.loc[busy, "ONNX batch (ms)"] == "n/a"
    without = cells.assign(onnx_speedup=np.nan, onnx_latency_ms_batch=np.nan)
    comp = Comparison(sel, without, statistics.aggregate(without), comp.tests, [])
    assert "ONNX speedup" not in display_frame(comp).columns  # no cell timed in ONNX Runtime: no column
