"""Statistics for ``prunebench compare``: the comparison table and the test of each target's lead.

* :func:`aggregate` -- one row per (model, dataset, method label, target): mean, sample standard deviation
  (ddof=1, blank for n = 1) and n of test top-1 and of its per-seed differences to the dense model, to the
  dense control and to the best method at the target (all paired by seed: every method of a seed shares
  the dense model and the data order), plus MACs, parameters, latency, speedup and the sparsity
  diagnostics of regularized methods; one dense row and one dense-control row per (model, dataset);
* :func:`significance` -- per target, the best method by mean test top-1 and a two-sided paired t-test of
  its lead over the runner-up on the per-seed differences; Welch's t-test on the per-seed values where the
  two seed sets differ (no statement with fewer than two seeds, nor when the differences do not vary).

Top-1 values are stored as fractions and shown as percentages; differences are percentage points. Why
paired by seed: docs/fairness.md.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from prunebench.commands.compare.reading import CONTROL_KEYS, GROUP_KEYS
from prunebench.tracking.schema import CONTROL_KIND

CONTROL_LABEL = "dense (same epochs)"  # shown when a control run has no method_label param
PAIRED_TEST = "paired t-test"
WELCH_TEST = "Welch's t-test"
TEST_NAME = (
    "two-sided paired t-test on the per-seed differences in test top-1 between the best method and the "
    "runner-up (paired by seed); two-sided Welch's t-test (unequal variances) on the per-seed values where "
    "the two methods' seed sets differ"
)
FLAT_PP = 1e-9  # a spread of per-seed values below this (pp) is float rounding, not seed-to-seed variation

# Columns of the machine-readable table (CSV/JSON), in order; units are in the names.
TABLE_COLUMNS = [
    "model",
    "dataset",
    "kind",
    "method",
    "method_label",
    "target",
    "n",
    "top1_pct",
    "top1_pct_std",
    "delta_pp",
    "delta_pp_std",
    "vs_control_pp",
    "vs_control_pp_std",
    "vs_control_n",
    "vs_best_pp",
    "vs_best_pp_std",
    "vs_best_n",
    "macs_M",
    "macs_conv_fc_M",
    "macs_reduction_pct",
    "params_M",
    "params_reduction_pct",
    "latency_ms",
    "latency_ms_batch",
    "speedup",
    "speedup_spread",
    "speedup_b1",
    "onnx_latency_ms",
    "onnx_latency_ms_batch",
    "onnx_speedup",
    "onnx_speedup_spread",
    "sparsity_zero_pct",
    "sparsity_pull",
    "penalty_ratio",
    "rank",
    "test_vs_next",
    "p_vs_next",
]


def _per_cell_values(cells: pd.DataFrame) -> pd.DataFrame:
    """Display units per cell: percentages, percentage points, millions."""
    return cells.assign(
        top1=cells["test_top1"] * 100,
        delta=(cells["test_top1"] - cells["dense_test_top1"]) * 100,
        macs_M=cells["macs"] / 1e6,
        macs_conv_fc_M=cells["macs_conv_fc"] / 1e6,
        macs_red=cells["macs_reduction"] * 100,
        params_M=cells["params"] / 1e6,
        params_red=cells["params_reduction"] * 100,
        zero_pct=cells["sparsity_zero_frac"] * 100,
    )


def _dense_rows(v: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset): the dense model of each seed, then mean/std over seeds.

    Every cell of a seed carries the same dense figures, so take them once per seed. The schema's minimum
    has no dense latency; then the one at the larger batch follows from speedup = dense / pruned latency.
    """
    lat_batch = v["dense_latency_ms_batch"].fillna(v["latency_ms_batch"] * v["speedup"])
    per_seed = (
        v.assign(lat_batch=lat_batch)
        .groupby(["model", "dataset", "seed"], sort=False)
        .agg(
            top1=("dense_test_top1", "mean"),
            macs=("macs_dense", "mean"),
            macs_cf=("macs_conv_fc_dense", "mean"),
            params=("params_dense", "mean"),
            lat=("dense_latency_ms", "mean"),
            lat_batch=("lat_batch", "mean"),
            onnx_lat=("dense_onnx_latency_ms", "mean"),
            onnx_lat_batch=("dense_onnx_latency_ms_batch", "mean"),
        )
        .reset_index()
    )
    dense = (
        per_seed.groupby(["model", "dataset"], sort=False)
        .agg(
            n=("top1", "count"),
            top1_pct=("top1", "mean"),
            top1_pct_std=("top1", "std"),
            macs=("macs", "mean"),
            macs_cf=("macs_cf", "mean"),
            params=("params", "mean"),
            latency_ms=("lat", "mean"),
            latency_ms_batch=("lat_batch", "mean"),
            onnx_latency_ms=("onnx_lat", "mean"),
            onnx_latency_ms_batch=("onnx_lat_batch", "mean"),
        )
        .reset_index()
    )
    dense = dense[dense[["top1_pct", "macs", "params"]].notna().any(axis=1)]  # nothing dense was logged
    return dense.assign(
        kind="dense",
        method="dense",
        method_label="dense",
        target=math.nan,
        top1_pct=dense["top1_pct"] * 100,
        top1_pct_std=dense["top1_pct_std"] * 100,
        macs_M=dense["macs"] / 1e6,
        macs_conv_fc_M=dense["macs_cf"] / 1e6,
        params_M=dense["params"] / 1e6,
        macs_reduction_pct=0.0,
        params_reduction_pct=0.0,
        speedup=np.where(dense["latency_ms_batch"].notna(), 1.0, np.nan),
        onnx_speedup=np.where(dense["onnx_latency_ms_batch"].notna(), 1.0, np.nan),
    ).drop(columns=["macs", "macs_cf", "params"])


def _summary(v: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean (and sd) over seeds of the per-cell display values of ``v``, one row per ``keys``."""
    return (
        v.groupby(keys, sort=False)
        .agg(
            method=("method", "first"),
            n=("top1", "count"),
            top1_pct=("top1", "mean"),
            top1_pct_std=("top1", "std"),
            delta_pp=("delta", "mean"),
            delta_pp_std=("delta", "std"),
            macs_M=("macs_M", "mean"),
            macs_conv_fc_M=("macs_conv_fc_M", "mean"),
            macs_reduction_pct=("macs_red", "mean"),
            params_M=("params_M", "mean"),
            params_reduction_pct=("params_red", "mean"),
            latency_ms=("latency_ms", "mean"),
            latency_ms_batch=("latency_ms_batch", "mean"),
            speedup=("speedup", "mean"),
            speedup_spread=("speedup_spread", "max"),  # the worst seed: one noisy seed makes the mean noisy
            speedup_b1=("speedup_b1", "mean"),
            onnx_latency_ms=("onnx_latency_ms", "mean"),
            onnx_latency_ms_batch=("onnx_latency_ms_batch", "mean"),
            onnx_speedup=("onnx_speedup", "mean"),
            onnx_speedup_spread=("onnx_speedup_spread", "max"),
            sparsity_zero_pct=("zero_pct", "mean"),
            sparsity_pull=("sparsity_pull", "mean"),
            penalty_ratio=("penalty_ratio", "mean"),
        )
        .reset_index()
    )


def _control_rows(controls: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset): the dense controls (unpruned, same extra epochs), mean/std over seeds."""
    v = _per_cell_values(controls).assign(method_label=controls["method_label"].fillna(CONTROL_LABEL))
    rows = _summary(v, ["model", "dataset"])
    label = v.groupby(["model", "dataset"], sort=False)["method_label"].first().to_numpy()
    return rows.assign(
        kind=CONTROL_KIND,
        method_label=label,
        target=math.nan,
        macs_reduction_pct=rows["macs_reduction_pct"].fillna(0.0),
        params_reduction_pct=rows["params_reduction_pct"].fillna(0.0),
    )


def ranked_methods(cells: pd.DataFrame) -> list[str]:
    """Method labels of one (model, dataset, target) by mean test top-1, best first (ties: label order)."""
    means = cells.groupby("method_label")["test_top1"].mean()
    return sorted(means.index, key=lambda k: -means[k])


def best_methods(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (model, dataset, target) the best method label (column ``best``)."""
    rows = [(*key, ranked_methods(grp)[0]) for key, grp in cells.groupby(["model", "dataset", "target"], sort=True)]
    return pd.DataFrame(rows, columns=["model", "dataset", "target", "best"])


def _paired_differences(v: pd.DataFrame, ref: pd.DataFrame, on: list[str], name: str) -> pd.DataFrame:
    """Per (model, dataset, method label, target): mean, sd and n over the common seeds of top-1 minus ``ref``.

    ``ref`` has the columns ``on`` (which include ``seed``) and ``ref``, the reference top-1 (%) of that seed.
    """
    pairs = v.merge(ref, on=on, how="inner")
    return (
        pairs.assign(diff=pairs["top1"] - pairs["ref"])
        .groupby(GROUP_KEYS, sort=False)
        .agg(**{f"{name}_pp": ("diff", "mean"), f"{name}_pp_std": ("diff", "std"), f"{name}_n": ("diff", "count")})
        .reset_index()
    )


def _vs_best(v: pd.DataFrame) -> pd.DataFrame:
    """Per-seed difference to the best method at the same target; exactly 0 (no sd) for the best itself."""
    best = best_methods(v)
    ref_cells = v.merge(best, on=["model", "dataset", "target"])
    ref_cells = ref_cells[ref_cells["method_label"] == ref_cells["best"]]
    ref = ref_cells[["model", "dataset", "target", "seed"]].assign(ref=ref_cells["top1"])
    out = _paired_differences(v, ref, ["model", "dataset", "target", "seed"], "vs_best")
    is_best = out.merge(best, on=["model", "dataset", "target"], how="left")["best"].eq(out["method_label"])
    out.loc[is_best.to_numpy(), ["vs_best_pp", "vs_best_pp_std"]] = [0.0, math.nan]
    return out


def _vs_control(v: pd.DataFrame, controls: pd.DataFrame) -> pd.DataFrame:
    """Per-seed difference to the dense control of the same seed (empty without controls)."""
    ref = controls[CONTROL_KEYS].assign(ref=controls["test_top1"] * 100)
    return _paired_differences(v, ref, CONTROL_KEYS, "vs_control")


_KIND_ORDER = {"dense": 0, CONTROL_KIND: 1, "pruned": 2}


def aggregate(cells: pd.DataFrame, controls: pd.DataFrame | None = None) -> pd.DataFrame:
    """The comparison table: one row per (model, dataset, method label, target), one dense row each and,
    when dense controls were run, one dense-control row each.

    Rows are ordered dense, dense control, then by target, best mean test top-1 first; ``rank`` is 1 for the
    best method at its target. Standard deviations are sample standard deviations (blank for n = 1).
    """
    controls = controls if controls is not None else cells.iloc[:0]
    v = _per_cell_values(cells)
    methods = _summary(v, GROUP_KEYS).assign(kind="pruned")
    for extra in (_vs_control(v, controls), _vs_best(v)):
        methods = methods.merge(extra, on=GROUP_KEYS, how="left")
    methods = methods.astype({"vs_control_n": "Int64", "vs_best_n": "Int64"})  # blank, not NaN, without pairs
    methods["rank"] = (
        methods.groupby(["model", "dataset", "target"])["top1_pct"].rank(ascending=False, method="min").astype("Int64")
    )
    parts = [
        p
        for p in (_dense_rows(v), _control_rows(controls) if len(controls) else None, methods)
        if p is not None and len(p)
    ]
    table = pd.concat(parts, ignore_index=True)
    table = table.assign(order=table["kind"].map(_KIND_ORDER)).sort_values(
        ["model", "dataset", "order", "target", "top1_pct"],
        ascending=[True, True, True, True, False],
        kind="stable",
        na_position="first",
    )
    table["test_vs_next"], table["p_vs_next"] = None, math.nan
    return table.reindex(columns=TABLE_COLUMNS).reset_index(drop=True)


def _seed_values(cells: pd.DataFrame, label: str) -> pd.Series:
    """Test top-1 (%) of one method, indexed by seed."""
    rows = cells[cells["method_label"] == label]
    return pd.Series(rows["test_top1"].to_numpy() * 100, index=rows["seed"].to_numpy())


def _flat(x: np.ndarray) -> bool:
    return len(x) > 0 and float(np.ptp(x)) <= FLAT_PP


def _paired_test(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """Paired t-test of ``a`` - ``b`` over their (identical) seeds, or why none is possible."""
    diff = (a - b.reindex(a.index)).to_numpy()
    out: dict[str, Any] = {"test": PAIRED_TEST, "n": len(diff)}
    if len(diff) < 2:
        return out | {"verdict": "n < 2 common seeds: no significance statement is possible"}
    if _flat(diff):  # t = lead / 0: scipy says p = 0, which would claim certainty from no noise estimate
        return out | {"verdict": "identical per-seed differences: the paired t-test is undefined"}
    with warnings.catch_warnings():  # "precision loss" for nearly identical differences; the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(a.to_numpy(), b.reindex(a.index).to_numpy())
    return out | {"statistic": float(res.statistic), "df": float(res.df), "p_value": float(res.pvalue)}


def _welch_test(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """Welch's t-test of the per-seed values of ``a`` and ``b`` (different seed sets), or why none is possible."""
    out: dict[str, Any] = {"test": WELCH_TEST, "n": len(a) + len(b)}
    if min(len(a), len(b)) < 2:
        return out | {"verdict": "n < 2 on one side: no significance statement is possible"}
    if _flat(a.to_numpy()) and _flat(b.to_numpy()):
        return out | {"verdict": "no seed-to-seed variation on either side: Welch's t-test is undefined"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(a.to_numpy(), b.to_numpy(), equal_var=False)
    return out | {"statistic": float(res.statistic), "df": float(res.df), "p_value": float(res.pvalue)}


def _verdict(p: float, alpha: float) -> str:
    if math.isnan(p):
        return "the t-test is undefined for these values"
    return f"lead larger than seed noise (p < {alpha:g})" if p < alpha else f"lead within seed noise (p >= {alpha:g})"


def _test_lead(a: pd.Series, b: pd.Series, alpha: float) -> dict[str, Any]:
    """The paired test where both methods ran the same seeds, else Welch's; with its verdict."""
    same = set(a.index) == set(b.index)
    row = {
        "statistic": math.nan,
        "df": math.nan,
        "p_value": math.nan,
        **(_paired_test(a, b) if same else _welch_test(a, b)),
    }
    if "verdict" not in row:
        row["verdict"] = _verdict(row["p_value"], alpha)
    return row


def significance(cells: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per (model, dataset, target): the best method, its lead over the runner-up and a two-sided t-test.

    Every method of a seed shares the dense model and the data order, so the test pairs the two methods by
    seed (paired t-test on the per-seed differences); where their seed sets differ, Welch's t-test on the
    per-seed values. The p-value says how often seed noise alone would give a lead at least this large. With
    fewer than two seeds, or per-seed differences that do not vary, no statement is made.
    """
    rows = []
    for (model, dataset, target), grp in cells.groupby(["model", "dataset", "target"], sort=True):
        ranked = ranked_methods(grp)
        a = _seed_values(grp, ranked[0])
        row: dict[str, Any] = {
            "model": model,
            "dataset": dataset,
            "target": target,
            "best": ranked[0],
            "runner_up": None,
            "best_top1_pct": a.mean(),
            "runner_up_top1_pct": math.nan,
            "lead_pp": math.nan,
            "n_best": len(a),
            "n_runner_up": 0,
            "n_common": 0,
            "test": None,
            "statistic": math.nan,
            "df": math.nan,
            "n": 0,
            "p_value": math.nan,
        }
        if len(ranked) == 1:
            rows.append(row | {"verdict": "only one method at this target: nothing to compare"})
            continue
        b = _seed_values(grp, ranked[1])
        row.update(
            runner_up=ranked[1],
            runner_up_top1_pct=b.mean(),
            lead_pp=a.mean() - b.mean(),
            n_runner_up=len(b),
            n_common=len(a.index.intersection(b.index)),
        )
        rows.append(row | _test_lead(a, b, alpha))
    return pd.DataFrame(rows)
