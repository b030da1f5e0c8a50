"""``prunebench compare``: read cells back from MLflow and lay them side by side.

The comparison is built only from what the tracking schema (docs/design.md, "Tracking schema") promises, so
it works on runs that any tool logged by those names, not just on ``prunebench run``'s:

1. **select** -- an experiment (the recipe's name), one or more parent runs (one per ``prunebench run``
   invocation; default the latest) and an optional MLflow filter string on the cell (child) runs;
2. **clean** -- cells that did not finish are left out (and counted in a note); when several invocations
   are combined, a cell repeated for the same (model, dataset, method, target, seed) keeps its latest
   run, so ``n`` counts seeds, never re-runs. Dense controls (``prunebench.kind`` = ``control``: the dense
   model trained unpruned for the same extra epochs) follow the same rules, one per (model, dataset, seed),
   for the seeds of the selected cells;
3. **aggregate** -- one row per (model, dataset, method label, target): mean, sample standard deviation
   (ddof=1, blank for n=1) and n of test top-1 and of its per-seed differences to the dense model, to the
   dense control and to the best method at the target (all paired by seed: every method of a seed shares
   the dense model and the data order), plus MACs, parameters, latency, speedup and the sparsity
   diagnostics of regularized methods; one dense row and one dense-control row per (model, dataset);
4. **judge** -- per target, the best method by mean test top-1 and a two-sided paired t-test of its lead
   over the runner-up on the per-seed differences; Welch's t-test on the per-seed values where the two
   seed sets differ (no statement with fewer than two seeds, nor when the differences do not vary);
5. **render** -- an aligned terminal table, Markdown, CSV, HTML or JSON; ``--out DIR`` writes every format
   plus the plots of :mod:`prunebench.plots`.

Top-1 values are stored as fractions and shown as percentages; differences are percentage points.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from prunebench.errors import UserError, close_matches
from prunebench.tracking.schema import DEFAULT_URI, KIND_TAG, STAGES_TAG
from prunebench.tracking.store import resolve_uri

if TYPE_CHECKING:  # mlflow is slow to import; only the commands that read runs pay for it
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
CELL_KIND = "cell"
CONTROL_KIND = "control"  # the dense model trained unpruned for the same extra stages as the cells
CONTROL_LABEL = "dense (same epochs)"  # shown when a control run has no method_label param
GROUP_KEYS = ["model", "dataset", "method_label", "target"]
CELL_KEYS = [*GROUP_KEYS, "seed"]
CONTROL_KEYS = ["model", "dataset", "seed"]
FINAL_METRICS = (
    "test_top1", "val_top1", "dense_test_top1", "macs", "macs_conv_fc", "macs_dense", "macs_reduction",
    "params", "params_reduction", "params_dense", "latency_ms", "latency_ms_batch", "speedup",
)
# Logged by `prunebench run` beyond the schema's minimum: dense figures (used for the dense row when present)
# and the sparsity diagnostics of regularized methods (blank for the others).
OPTIONAL_METRICS = ("macs_conv_fc_dense", "dense_latency_ms", "dense_latency_ms_batch",
                    "sparsity_zero_frac", "sparsity_pull", "penalty_ratio")
CURVE_METRICS = ("train_loss", "train_penalty", "train_top1", "val_top1", "lr")
NORMS_ARTIFACT = "sparsity_norms.json"
FORMATS = ("text", "md", "csv", "html", "json")
OUT_FILES = {"md": "table.md", "csv": "table.csv", "html": "table.html", "json": "table.json"}
PAIRED_TEST = "paired t-test"
WELCH_TEST = "Welch's t-test"
TEST_NAME = ("two-sided paired t-test on the per-seed differences in test top-1 between the best method and the "
             "runner-up (paired by seed); two-sided Welch's t-test (unequal variances) on the per-seed values where "
             "the two methods' seed sets differ")
FLAT_PP = 1e-9  # a spread of per-seed values below this (pp) is float rounding, not seed-to-seed variation

# Columns of the machine-readable table (CSV/JSON), in order; units are in the names.
TABLE_COLUMNS = [
    "model", "dataset", "kind", "method", "method_label", "target", "n",
    "top1_pct", "top1_pct_std", "delta_pp", "delta_pp_std",
    "vs_control_pp", "vs_control_pp_std", "vs_control_n", "vs_best_pp", "vs_best_pp_std", "vs_best_n",
    "macs_M", "macs_conv_fc_M", "macs_reduction_pct", "params_M", "params_reduction_pct",
    "latency_ms", "latency_ms_batch", "speedup", "sparsity_zero_pct", "sparsity_pull", "penalty_ratio",
    "rank", "test_vs_next", "p_vs_next",
]


# --------------------------------------------------------------------------------------------------
# selection


@dataclass
class Selection:
    """What was searched, kept so every message and output can say where the numbers came from."""

    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_ids: list[str] = field(default_factory=list)  # empty: every cell of the experiment
    filter_string: str | None = None
    parent_started: str | None = None  # start time of the single selected invocation, for the header
    all_runs: bool = False  # asked for every invocation (else no parent run exists: cells from another tool)

    def describe(self) -> str:
        """One line naming the URI, experiment, invocation(s) and filter."""
        if not self.parent_run_ids:
            runs = "all invocations" if self.all_runs else "every cell run (no parent runs found)"
        elif len(self.parent_run_ids) == 1:
            when = f" started {self.parent_started}" if self.parent_started else ""
            runs = f"parent run {self.parent_run_ids[0]}{when}"
        else:
            runs = f"parent runs {', '.join(self.parent_run_ids)}"
        filt = f", filter {self.filter_string!r}" if self.filter_string else ""
        return f"tracking URI {self.tracking_uri}, experiment {self.experiment!r}, {runs}{filt}"


def _local_store_path(uri: str) -> Path | None:
    """The file or folder a local tracking URI points at (None for servers)."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return None if path in ("", ":memory:") else Path(path)
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a plain path (or C:\...)
        return Path(uri)
    return None


def open_client(uri: str) -> MlflowClient:
    """A client for ``uri``; refuses a local store that does not exist rather than creating an empty one."""
    path = _local_store_path(uri)
    if path is not None and not path.exists():
        where = "" if str(path.resolve()) in uri else f" ({path.resolve()})"
        raise UserError(
            f"no MLflow tracking store at {uri}{where}: it does not exist; run `prunebench run RECIPE` first, "
            "or point at the store with --tracking-uri or MLFLOW_TRACKING_URI"
        )
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str, order_by: list[str] | None = None,
                max_results: int | None = None) -> list[Run]:
    """Every run matching ``filter_string``, following MLflow's pagination."""
    from mlflow.exceptions import MlflowException

    runs: list[Run] = []
    token: str | None = None
    page = 1000 if max_results is None else min(max_results, 1000)
    while True:
        try:
            batch = client.search_runs([experiment_id], filter_string, max_results=page, order_by=order_by,
                                       page_token=token)
        except MlflowException as exc:
            raise UserError(
                f"MLflow rejected the run filter {filter_string!r}: {str(exc).splitlines()[0]} "
                "(use MLflow's syntax, e.g. --filter \"params.method = 'l1'\")"
            ) from None
        runs.extend(batch)
        token = batch.token
        if not token or (max_results is not None and len(runs) >= max_results):
            return runs


def list_experiments(client: MlflowClient, tracking_uri: str) -> list[Experiment]:
    """The store's active experiments; the first contact, so an unreachable store fails here, clearly."""
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_experiments())
    except (MlflowException, OSError) as exc:
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read the tracking store at {tracking_uri} ({msg}); start the server or fix "
                        "--tracking-uri / MLFLOW_TRACKING_URI") from None


def pick_experiment(experiments: Sequence[Experiment], name: str | None, tracking_uri: str) -> Experiment:
    """The experiment named ``name``, or the only non-Default one when no name is given."""
    if name is not None:
        hits = [e for e in experiments if e.name == name]
        if not hits:
            known = [e.name for e in experiments]
            raise UserError(f"no experiment {name!r} at {tracking_uri}.{close_matches(name, known)}")
        return hits[0]
    candidates = [e for e in experiments if e.name != "Default"]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UserError(f"no experiments at {tracking_uri}; run `prunebench run RECIPE` first or pass --tracking-uri")
    raise UserError(
        f"{len(candidates)} experiments at {tracking_uri} ({', '.join(sorted(e.name for e in candidates))}); "
        "choose one with --experiment NAME"
    )


def _when(run: Run) -> str:
    return pd.Timestamp(run.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M")


def select(client: MlflowClient, tracking_uri: str, experiment: str | None = None,
           run_ids: Sequence[str] = (), all_runs: bool = False, filter_string: str | None = None) -> Selection:
    """Resolve the command-line selection to an experiment and parent runs (without reading the cells)."""
    from mlflow.exceptions import MlflowException

    experiments = list_experiments(client, tracking_uri)
    parents: list[Run] = []
    for rid in run_ids:
        try:
            parents.append(client.get_run(rid))
        except MlflowException:
            raise UserError(
                f"run {rid!r} not found at {tracking_uri}; copy the parent run id from `mlflow ui`"
            ) from None
    if experiment is None and parents:
        exp_ids = {r.info.experiment_id for r in parents}
        if len(exp_ids) > 1:
            raise UserError("the --run-id runs belong to different experiments; compare one experiment at a time")
        exp = client.get_experiment(exp_ids.pop())
    else:
        exp = pick_experiment(experiments, experiment, tracking_uri)
    for run in parents:
        if run.info.experiment_id != exp.experiment_id:
            raise UserError(f"run {run.info.run_id} is not in experiment {exp.name!r}; drop --experiment or the run id")
        if run.data.tags.get(KIND_TAG) in (CELL_KIND, CONTROL_KIND):
            parent = run.data.tags.get(PARENT_TAG, "?")
            what = "cell" if run.data.tags.get(KIND_TAG) == CELL_KIND else "dense control"
            raise UserError(
                f"run {run.info.run_id} is a single {what}, not a `prunebench run` invocation; pass its parent "
                f"--run-id {parent}, or select cells with --filter"
            )
    sel = Selection(tracking_uri, exp.name, exp.experiment_id, [r.info.run_id for r in parents], filter_string,
                    all_runs=all_runs)
    if parents or all_runs:
        if len(parents) == 1:
            sel.parent_started = _when(parents[0])
        return sel
    latest = _search_all(client, exp.experiment_id, f"tags.`{KIND_TAG}` = 'parent'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    if latest:  # else no parent at all (cells logged by another tool): every cell of the experiment counts
        sel.parent_run_ids = [latest[0].info.run_id]
        sel.parent_started = _when(latest[0])
    return sel


# --------------------------------------------------------------------------------------------------
# cells


def _number(value: str | None, cast: type) -> Any:
    try:
        return cast(float(value)) if value is not None else None
    except ValueError:
        return None


def _cell_row(run: Run) -> dict[str, Any]:
    """One cell run flattened into the columns the comparison uses."""
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "parent_run_id": t.get(PARENT_TAG),
        "status": run.info.status,
        "start_time": run.info.start_time,
        "model": p.get("model", "?"),
        "dataset": p.get("dataset", "?"),
        "method": p.get("method"),
        "method_label": p.get("method_label") or p.get("method"),
        "seed": _number(p.get("seed"), int),
        "target": _number(p.get("target"), float),
        "stage_epochs": t.get(STAGES_TAG),
    }
    row.update({k: m.get(k, math.nan) for k in (*FINAL_METRICS, *OPTIONAL_METRICS)})
    return row


def _load_kind(client: MlflowClient, sel: Selection, kind: str, filter_string: str | None) -> pd.DataFrame:
    """Every run tagged ``kind`` under the selected parent run(s) (any status), one row each, oldest first."""
    filt = f"tags.`{KIND_TAG}` = '{kind}'"
    if len(sel.parent_run_ids) == 1:  # let the store do the narrowing in the common case
        filt += f" and tags.`{PARENT_TAG}` = '{sel.parent_run_ids[0]}'"
    if filter_string:
        filt += f" and {filter_string}"
    runs = _search_all(client, sel.experiment_id, filt)
    rows = pd.DataFrame([_cell_row(r) for r in runs], columns=[*_cell_row_columns()])
    if len(sel.parent_run_ids) > 1:
        rows = rows[rows["parent_run_id"].isin(sel.parent_run_ids)]
    return rows.sort_values("start_time", kind="stable").reset_index(drop=True)


def load_cells(client: MlflowClient, sel: Selection) -> pd.DataFrame:
    """Every cell run of the selection (any status), one row each, oldest first."""
    return _load_kind(client, sel, CELL_KIND, sel.filter_string)


def load_controls(client: MlflowClient, sel: Selection) -> pd.DataFrame:
    """Every dense-control run under the selected parent run(s) (any status), oldest first.

    ``--filter`` speaks of cells (method, target); controls are matched to the selected cells by seed instead
    (:func:`clean_controls`).
    """
    return _load_kind(client, sel, CONTROL_KIND, None)


def _cell_row_columns() -> list[str]:
    return ["run_id", "parent_run_id", "status", "start_time", "model", "dataset", "method", "method_label",
            "seed", "target", "stage_epochs", *FINAL_METRICS, *OPTIONAL_METRICS]


def _describe_cells(cells: pd.DataFrame, limit: int = 4) -> str:
    items = [f"{r.method_label} seed {r.seed} target {r.target:g}" if pd.notna(r.target) else
             f"{r.method_label} seed {r.seed}" if pd.notna(r.seed) else str(r.run_id)
             for r in cells.head(limit).itertuples()]
    more = f", ... ({len(cells)} in all)" if len(cells) > limit else ""
    return ", ".join(items) + more


def clean_cells(cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Finished, well-formed cells, one per (model, dataset, method label, target, seed); plus notes.

    Unfinished cells would bias the means toward whatever finished first, so they are left out and
    counted. A cell repeated across invocations keeps its latest run so that ``n`` counts seeds.
    """
    notes: list[str] = []
    unfinished = cells[cells["status"] != "FINISHED"]
    if len(unfinished):
        counts = ", ".join(f"{n} {s}" for s, n in unfinished["status"].value_counts().sort_index().items())
        notes.append(f"{len(unfinished)} cell(s) not finished and left out ({counts}): {_describe_cells(unfinished)}")
    done = cells[cells["status"] == "FINISHED"]
    bad = done[done[["method_label", "seed", "target"]].isna().any(axis=1)]
    if len(bad):
        notes.append(f"{len(bad)} finished run(s) without the method/seed/target params left out: "
                     f"{', '.join(bad['run_id'].head(4))}")
        done = done.drop(bad.index)
    no_top1 = done[done["test_top1"].isna()]
    if len(no_top1):
        notes.append(f"{len(no_top1)} finished cell(s) without a test_top1 metric left out: {_describe_cells(no_top1)}")
        done = done.drop(no_top1.index)
    deduped = done.drop_duplicates(subset=CELL_KEYS, keep="last")
    if len(deduped) < len(done):
        notes.append(f"{len(done) - len(deduped)} repeated cell(s) (same method, target and seed in several "
                     "invocations) counted once, from the latest run")
    return deduped.astype({"seed": int, "target": float}).reset_index(drop=True), notes


def clean_controls(controls: pd.DataFrame, cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Finished dense controls of the cells' (model, dataset, seed)s, the latest run of each; plus notes."""
    notes: list[str] = []
    unfinished = controls[controls["status"] != "FINISHED"]
    if len(unfinished):
        counts = ", ".join(f"{n} {s}" for s, n in unfinished["status"].value_counts().sort_index().items())
        notes.append(f"{len(unfinished)} dense control run(s) not finished and left out ({counts}): "
                     f"{_describe_cells(unfinished)}")
    done = controls[(controls["status"] == "FINISHED") & controls["seed"].notna()]
    no_top1 = done[done["test_top1"].isna()]
    if len(no_top1):
        notes.append(f"{len(no_top1)} finished dense control run(s) without a test_top1 metric left out: "
                     f"{_describe_cells(no_top1)}")
        done = done.drop(no_top1.index)
    done = done.astype({"seed": int}).merge(cells[CONTROL_KEYS].drop_duplicates(), on=CONTROL_KEYS)
    deduped = done.drop_duplicates(subset=CONTROL_KEYS, keep="last")
    if len(deduped) < len(done):
        notes.append(f"{len(done) - len(deduped)} repeated dense control run(s) (same seed) counted once, "
                     "from the latest run")
    return deduped.reset_index(drop=True), notes


# --------------------------------------------------------------------------------------------------
# aggregation and statistics


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
        .agg(top1=("dense_test_top1", "mean"), macs=("macs_dense", "mean"), macs_cf=("macs_conv_fc_dense", "mean"),
             params=("params_dense", "mean"), lat=("dense_latency_ms", "mean"), lat_batch=("lat_batch", "mean"))
        .reset_index()
    )
    dense = (
        per_seed.groupby(["model", "dataset"], sort=False)
        .agg(n=("top1", "count"), top1_pct=("top1", "mean"), top1_pct_std=("top1", "std"), macs=("macs", "mean"),
             macs_cf=("macs_cf", "mean"), params=("params", "mean"), latency_ms=("lat", "mean"),
             latency_ms_batch=("lat_batch", "mean"))
        .reset_index()
    )
    dense = dense[dense[["top1_pct", "macs", "params"]].notna().any(axis=1)]  # nothing dense was logged
    return dense.assign(
        kind="dense", method="dense", method_label="dense", target=math.nan, top1_pct=dense["top1_pct"] * 100,
        top1_pct_std=dense["top1_pct_std"] * 100, macs_M=dense["macs"] / 1e6, macs_conv_fc_M=dense["macs_cf"] / 1e6,
        params_M=dense["params"] / 1e6, macs_reduction_pct=0.0, params_reduction_pct=0.0,
        speedup=np.where(dense["latency_ms_batch"].notna(), 1.0, np.nan),
    ).drop(columns=["macs", "macs_cf", "params"])


def _summary(v: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean (and sd) over seeds of the per-cell display values of ``v``, one row per ``keys``."""
    return (
        v.groupby(keys, sort=False)
        .agg(method=("method", "first"), n=("top1", "count"), top1_pct=("top1", "mean"),
             top1_pct_std=("top1", "std"), delta_pp=("delta", "mean"), delta_pp_std=("delta", "std"),
             macs_M=("macs_M", "mean"), macs_conv_fc_M=("macs_conv_fc_M", "mean"),
             macs_reduction_pct=("macs_red", "mean"), params_M=("params_M", "mean"),
             params_reduction_pct=("params_red", "mean"), latency_ms=("latency_ms", "mean"),
             latency_ms_batch=("latency_ms_batch", "mean"), speedup=("speedup", "mean"),
             sparsity_zero_pct=("zero_pct", "mean"), sparsity_pull=("sparsity_pull", "mean"),
             penalty_ratio=("penalty_ratio", "mean"))
        .reset_index()
    )


def _control_rows(controls: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset): the dense controls (unpruned, same extra epochs), mean/std over seeds."""
    v = _per_cell_values(controls).assign(method_label=controls["method_label"].fillna(CONTROL_LABEL))
    rows = _summary(v, ["model", "dataset"])
    label = v.groupby(["model", "dataset"], sort=False)["method_label"].first().to_numpy()
    return rows.assign(kind=CONTROL_KIND, method_label=label, target=math.nan,
                       macs_reduction_pct=rows["macs_reduction_pct"].fillna(0.0),
                       params_reduction_pct=rows["params_reduction_pct"].fillna(0.0))


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
    parts = [p for p in (_dense_rows(v), _control_rows(controls) if len(controls) else None, methods)
             if p is not None and len(p)]
    table = pd.concat(parts, ignore_index=True)
    table = table.assign(order=table["kind"].map(_KIND_ORDER)).sort_values(
        ["model", "dataset", "order", "target", "top1_pct"], ascending=[True, True, True, True, False], kind="stable",
        na_position="first")
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
    from scipy import stats

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
    from scipy import stats

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
    row = {"statistic": math.nan, "df": math.nan, "p_value": math.nan,
           **(_paired_test(a, b) if same else _welch_test(a, b))}
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
        row: dict[str, Any] = {"model": model, "dataset": dataset, "target": target, "best": ranked[0],
                               "runner_up": None, "best_top1_pct": a.mean(), "runner_up_top1_pct": math.nan,
                               "lead_pp": math.nan, "n_best": len(a), "n_runner_up": 0, "n_common": 0,
                               "test": None, "statistic": math.nan, "df": math.nan, "n": 0, "p_value": math.nan}
        if len(ranked) == 1:
            rows.append(row | {"verdict": "only one method at this target: nothing to compare"})
            continue
        b = _seed_values(grp, ranked[1])
        row.update(runner_up=ranked[1], runner_up_top1_pct=b.mean(), lead_pp=a.mean() - b.mean(), n_runner_up=len(b),
                   n_common=len(a.index.intersection(b.index)))
        rows.append(row | _test_lead(a, b, alpha))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# the comparison as one object


@dataclass
class Comparison:
    """Everything a rendering needs: the selection, the cells and controls used, the table, tests and notes."""

    selection: Selection
    cells: pd.DataFrame
    table: pd.DataFrame
    tests: pd.DataFrame
    notes: list[str]
    alpha: float = 0.05
    controls: pd.DataFrame = field(default_factory=pd.DataFrame)


def build(client: MlflowClient, sel: Selection, alpha: float = 0.05) -> Comparison:
    """Read, clean, aggregate and test the selected cells and dense controls; a clear UserError when no cell is left."""
    raw = load_cells(client, sel)
    if raw.empty:
        hint = ("drop or loosen --filter" if sel.filter_string else
                "pick another invocation with --run-id, or take every invocation with --all-runs"
                if sel.parent_run_ids else "check that the runs carry the tag prunebench.kind=cell")
        raise UserError(f"no cell runs match ({sel.describe()}); {hint}")
    cells, notes = clean_cells(raw)
    if cells.empty:
        raise UserError(f"none of the {len(raw)} matching cell runs finished with a test_top1 metric "
                        f"({sel.describe()}); {' '.join(notes)}")
    controls, control_notes = clean_controls(load_controls(client, sel), cells)
    notes += control_notes
    if not sel.parent_run_ids and not sel.all_runs:
        notes.insert(0, "the experiment has no parent runs: every cell run in it is included")
    table = aggregate(cells, controls)
    tests = significance(cells, alpha)
    for t in tests.itertuples():
        hit = (table["model"] == t.model) & (table["dataset"] == t.dataset) & (table["target"] == t.target) & (
            table["method_label"] == t.best)
        table.loc[hit, ["test_vs_next", "p_vs_next"]] = [t.test if t.runner_up is not None else None, t.p_value]
    return Comparison(sel, cells, table, tests, notes, alpha, controls)


# --------------------------------------------------------------------------------------------------
# rendering


def _amount(x: float) -> str:
    """Counts in millions or milliseconds: enough digits for tiny models without noise for big ones."""
    if pd.isna(x):
        return ""
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def _mean_sd(mean: float, sd: float, signed: bool = False) -> str:
    if pd.isna(mean):
        return ""
    m = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return f"{m} ± {sd:.2f}" if pd.notna(sd) else m


def _constant(table: pd.DataFrame, col: str) -> bool:
    return table[col].nunique() == 1


def display_frame(comp: Comparison) -> pd.DataFrame:
    """The table as strings for people: combined mean ± sd, the best method starred, units in headers.

    Model and dataset columns appear only when the selection spans several (else they go in the title).
    """
    t = comp.table
    out = pd.DataFrame(index=t.index)
    if not (_constant(t, "model") and _constant(t, "dataset")):
        out["model"], out["dataset"] = t["model"], t["dataset"]
    out["method"] = t["method_label"] + np.where(t["rank"].eq(1).fillna(False), " *", "")
    out["target"] = t["target"].map(lambda x: "-" if pd.isna(x) else f"{x:.2f}")
    out["n"] = t["n"].astype(str)
    out["top-1 %"] = [_mean_sd(m, s) for m, s in zip(t["top1_pct"], t["top1_pct_std"], strict=True)]
    for col, key in DIFF_COLUMNS.items():
        out[col] = [_mean_sd(m, s, signed=True) for m, s in zip(t[f"{key}_pp"], t[f"{key}_pp_std"], strict=True)]
    out["zeroed %"] = t["sparsity_zero_pct"].map(lambda x: "" if pd.isna(x) else f"{x:.1f}")
    out["MACs (M)"] = t["macs_M"].map(_amount)
    out["conv+fc MACs (M)"] = t["macs_conv_fc_M"].map(_amount)
    out["MACs red. %"] = t["macs_reduction_pct"].map(lambda x: "" if pd.isna(x) else f"{x:.1f}")
    out["params (M)"] = t["params_M"].map(_amount)
    out["params red. %"] = t["params_reduction_pct"].map(lambda x: "" if pd.isna(x) else f"{x:.1f}")
    out["latency b=1 (ms)"] = t["latency_ms"].map(_amount)
    out["latency batch (ms)"] = t["latency_ms_batch"].map(_amount)
    out["speedup"] = t["speedup"].map(lambda x: "" if pd.isna(x) else f"{x:.2f}x")
    return out.loc[:, (out != "").any(axis=0) | ~out.columns.isin(_OPTIONAL_DISPLAY)].reset_index(drop=True)


# per-seed differences shown as mean ± sd (pp): display header -> column stem in the table
DIFF_COLUMNS = {"vs dense (pp)": "delta", "vs dense (same epochs, pp)": "vs_control", "vs best (pp)": "vs_best"}
# columns dropped from the display when every row is blank (e.g. no latency measured)
_OPTIONAL_DISPLAY = ["zeroed %", "conv+fc MACs (M)", "latency b=1 (ms)", "latency batch (ms)", "speedup"]
_LEFT = {"model", "dataset", "method"}


def _pad(frame: pd.DataFrame) -> tuple[list[str], list[list[str]], list[int]]:
    header = list(frame.columns)
    body = frame.astype(str).values.tolist()
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(header)]
    return header, body, widths


def _cell_text(text: str, width: int, col: str) -> str:
    return text.ljust(width) if col in _LEFT else text.rjust(width)


def align(frame: pd.DataFrame) -> str:
    """Plain-text table with aligned columns (text left, numbers right) and a rule under the header."""
    header, body, widths = _pad(frame)
    lines = ["  ".join(_cell_text(h, w, h) for h, w in zip(header, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(_cell_text(c, w, h) for c, w, h in zip(r, widths, header, strict=True)).rstrip() for r in body]
    return "\n".join(lines)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown pipe table with the same alignment as :func:`align`."""
    escaped = frame.astype(str).apply(lambda col: col.str.replace("|", "\\|").str.replace("*", "\\*"))
    header, body, widths = _pad(escaped)
    widths = [max(w, 3) for w in widths]  # a delimiter cell needs a hyphen besides its colon
    rule = [(":" + "-" * (w - 1)) if h in _LEFT else ("-" * (w - 1) + ":") for h, w in zip(header, widths, strict=True)]
    rows = [header, rule, *body]
    return "\n".join("| " + " | ".join(_cell_text(c, w, h) for c, w, h in zip(r, widths, header, strict=True)) + " |"
                     for r in rows)


def title(comp: Comparison) -> str:
    """What is compared: model and dataset (when single), experiment and the number of cells."""
    t = comp.table
    what = (f"{t['model'].iloc[0]} on {t['dataset'].iloc[0]}"
            if _constant(t, "model") and _constant(t, "dataset") else "several models/datasets")
    seeds = comp.cells["seed"].nunique()
    controls = f", {len(comp.controls)} dense control(s)" if len(comp.controls) else ""
    return f"{what}: {len(comp.cells)} cells{controls}, {seeds} seed(s) (experiment {comp.selection.experiment!r})"


def verdict_lines(comp: Comparison) -> list[str]:
    """One sentence per target: who leads, by how much, and whether that exceeds seed noise."""
    lines = []
    several = not (_constant(comp.table, "model") and _constant(comp.table, "dataset"))
    for t in comp.tests.itertuples():
        where = f"{t.model}/{t.dataset} " if several else ""
        if t.runner_up is None:
            lines.append(f"{where}target {t.target:.2f}: {t.best} ({t.verdict})")
            continue
        lines.append(f"{where}target {t.target:.2f}: {t.best} leads {t.runner_up} by {t.lead_pp:+.2f} pp "
                     f"({_test_text(t)}): {t.verdict}")
    return lines


def _test_text(t: Any) -> str:
    """The test in words: its name, n and, where it was computed, t and p."""
    n = f"n = {t.n} seeds" if t.test == PAIRED_TEST else f"n = {t.n_best} vs {t.n_runner_up} seeds"
    stat = f", t = {t.statistic:.3g}, p = {t.p_value:.3g}" if pd.notna(t.p_value) else ""
    return f"{t.test}, {n}{stat}"


def _legend(comp: Comparison) -> str:
    control = "" if len(comp.controls) else " (no dense-control runs in this selection)"
    return (f"* best mean test top-1 at its target. mean ± sample sd over seeds of per-seed values and of "
            f"per-seed differences (pp): 'vs dense' to the dense model of the same seed, 'vs dense (same epochs)' "
            f"to the dense model trained unpruned for the same extra epochs{control}, 'vs best' to the best method "
            f"at the target; 'zeroed' is the share of regularized channels below 5% of their layer's starting "
            f"median norm after sparsity training (mean over seeds). Significance: {TEST_NAME}, alpha {comp.alpha:g}.")


def to_text(comp: Comparison) -> str:
    """The terminal rendering: title, selection, aligned table, one verdict per target, notes."""
    parts = [title(comp), comp.selection.describe(), "", align(display_frame(comp)), "", _legend(comp), ""]
    parts += ["Best per target:", *(f"  {s}" for s in verdict_lines(comp))]
    if comp.notes:
        parts += ["", "Notes:", *(f"  {s}" for s in comp.notes)]
    return "\n".join(parts) + "\n"


def to_markdown(comp: Comparison) -> str:
    """Markdown for reports and READMEs: the same content as the terminal table."""
    parts = [f"### {title(comp)}", "", f"Selection: {comp.selection.describe()}", "",
             markdown_table(display_frame(comp)), "", _legend(comp).replace("*", "\\*", 1), "",
             "**Best per target**", "", *(f"- {s}" for s in verdict_lines(comp))]
    if comp.notes:
        parts += ["", "**Notes**", "", *(f"- {s}" for s in comp.notes)]
    return "\n".join(parts) + "\n"


def to_csv(comp: Comparison) -> str:
    """The machine-readable table (numbers unrounded, units in the column names)."""
    return comp.table.to_csv(index=False)


def to_html(comp: Comparison) -> str:
    """A standalone HTML page: the display table, the tests and the notes."""
    tests = comp.tests.rename(columns={"p_value": "p", "statistic": "t"})
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in comp.notes)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>prunebench compare</title>\n"
        "<style>body{font-family:sans-serif} table{border-collapse:collapse} td,th{padding:2px 8px;"
        "border-bottom:1px solid #ccc;text-align:right} td:first-child,th:first-child{text-align:left}</style>"
        "</head><body>\n"
        f"<h3>{html.escape(title(comp))}</h3>\n<p>{html.escape(comp.selection.describe())}</p>\n"
        f"{display_frame(comp).to_html(index=False, escape=True)}\n<p>{html.escape(_legend(comp))}</p>\n"
        f"<h4>Best per target</h4>\n{tests.to_html(index=False, na_rep='', float_format='{:.4g}'.format)}\n"
        + (f"<h4>Notes</h4><ul>{notes}</ul>\n" if notes else "")
        + "</body></html>\n"
    )


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    # NaN -> null and numpy scalars -> plain numbers; full precision so tiny p-values do not round to 0
    return json.loads(frame.to_json(orient="records", double_precision=15))


def to_json(comp: Comparison) -> str:
    """Everything, machine-readable: selection, table rows, tests, the cells and controls used, the notes."""
    cells = comp.cells.drop(columns=["stage_epochs"])
    controls = comp.controls.drop(columns=["stage_epochs"], errors="ignore")
    doc = {
        "selection": {"tracking_uri": comp.selection.tracking_uri, "experiment": comp.selection.experiment,
                      "parent_run_ids": comp.selection.parent_run_ids, "filter": comp.selection.filter_string},
        "units": {"top1_pct": "percent", "delta_pp": "percentage points", "vs_control_pp": "percentage points",
                  "vs_best_pp": "percentage points", "macs_M": "millions of multiply-adds", "params_M": "millions",
                  "latency_ms": "milliseconds (batch 1)", "latency_ms_batch": "milliseconds (larger batch)",
                  "sparsity_zero_pct": "percent of the regularized channels",
                  "std": "sample standard deviation (ddof=1)"},
        "test": TEST_NAME, "alpha": comp.alpha,
        "rows": _records(comp.table), "significance": _records(comp.tests), "cells": _records(cells),
        "controls": _records(controls),
        "notes": comp.notes,
    }
    return json.dumps(doc, indent=2) + "\n"


RENDERERS = {"text": to_text, "md": to_markdown, "csv": to_csv, "html": to_html, "json": to_json}


def render(comp: Comparison, fmt: str) -> str:
    """The comparison in one of :data:`FORMATS`."""
    return RENDERERS[fmt](comp)


# --------------------------------------------------------------------------------------------------
# artifacts and histories for the plots


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """MLflow draws a progress bar per artifact download; a table command should not."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def load_layers(client: MlflowClient, cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The ``layers.csv`` artifacts of ``cells`` stacked, tagged with the cell keys and the layer order."""
    from mlflow.exceptions import MlflowException

    frames, missing = [], []
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        for i, cell in enumerate(cells.itertuples()):
            try:
                path = client.download_artifacts(cell.run_id, "layers.csv", os.path.join(tmp, str(i)))
                layers = pd.read_csv(path)
            except (MlflowException, OSError, pd.errors.ParserError):
                missing.append(cell.run_id)
                continue
            frames.append(layers.assign(order=range(len(layers)), **{k: getattr(cell, k) for k in CELL_KEYS}))
    notes = [f"{len(missing)} cell(s) without a readable layers.csv artifact: {', '.join(missing[:4])}"
             ] if missing else []
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


def _norms_of(client: MlflowClient, run_id: str, dst: str) -> dict[str, np.ndarray] | None:
    """A cell's ``sparsity_norms.json`` as sorted arrays ``start`` and ``end``; None when it has none.

    Raises ValueError (with the run id) when the artifact is there but cannot be read.
    """
    from mlflow.exceptions import MlflowException

    try:
        if not any(f.path == NORMS_ARTIFACT for f in client.list_artifacts(run_id)):
            return None
        doc = json.loads(Path(client.download_artifacts(run_id, NORMS_ARTIFACT, dst)).read_text(encoding="utf-8"))
        return {stage: np.sort(np.asarray(doc[stage], dtype=float).ravel()) for stage in ("start", "end")}
    except (MlflowException, OSError, json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(run_id) from exc


def load_norms(client: MlflowClient, cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Sorted normalized channel norms of each method's lowest seed with a ``sparsity_norms.json``.

    Long form: cell keys, ``stage`` (start/end of sparsity training), ``rank`` (0 = smallest) and ``value``.
    Methods without sparsity training have no such artifact and are skipped silently.
    """
    frames, bad = [], []
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        for _, grp in cells.sort_values("seed", kind="stable").groupby(["model", "dataset", "method_label"]):
            for cell in grp.itertuples():
                try:
                    norms = _norms_of(client, cell.run_id, os.path.join(tmp, cell.run_id))
                except ValueError:
                    bad.append(cell.run_id)
                    continue
                if norms is None:
                    continue
                keys = {k: getattr(cell, k) for k in CELL_KEYS}
                frames += [pd.DataFrame({"stage": stage, "rank": np.arange(len(v)), "value": v}).assign(**keys)
                           for stage, v in norms.items()]
                break
    notes = [f"{len(bad)} cell(s) with an unreadable {NORMS_ARTIFACT} artifact: {', '.join(bad[:4])}"] if bad else []
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


def load_history(client: MlflowClient, cells: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch metrics of ``cells`` in long form: cell keys, run_id, metric, step, value.

    ``val_top1`` is both a per-epoch and a final metric; a final value logged without a step lands on
    step 0 after the epochs were logged. Keeping the first value logged at each step drops such re-logs.
    """
    rows = [
        (cell.run_id, *(getattr(cell, k) for k in CELL_KEYS), key, m.step, m.timestamp, m.value)
        for cell in cells.itertuples()
        for key in CURVE_METRICS
        for m in client.get_metric_history(cell.run_id, key)
    ]
    history = pd.DataFrame(rows, columns=["run_id", *CELL_KEYS, "metric", "step", "timestamp", "value"])
    history = history.sort_values("timestamp", kind="stable").drop_duplicates(["run_id", "metric", "step"])
    return history.drop(columns="timestamp").sort_values(["run_id", "metric", "step"]).reset_index(drop=True)


def stage_epochs(cells: pd.DataFrame) -> dict[str, list[int]]:
    """The stage step ranges of the first cell that has a readable ``prunebench.stage_epochs`` tag."""
    for raw in cells["stage_epochs"].dropna():
        try:
            stages = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(stages, dict):
            return {str(k): list(v) for k, v in stages.items() if isinstance(v, list) and len(v) == 2}
    return {}


def pick_layers_target(comp: Comparison, wanted: float | None) -> float:
    """``--layers-target`` if it was run, else the smallest target of the selection."""
    targets = sorted(comp.cells["target"].unique())
    if wanted is None:
        return targets[0]
    hits = [t for t in targets if math.isclose(t, wanted, abs_tol=1e-9)]
    if not hits:
        raise UserError(f"--layers-target {wanted:g} was not run in this selection; "
                        f"targets: {', '.join(f'{t:g}' for t in targets)}")
    return hits[0]


def write_outputs(client: MlflowClient, comp: Comparison, out_dir: Path, layers_target: float | None = None,
                  plots: bool = True) -> list[Path]:
    """Write table.{md,csv,html,json} and the PNG plots into ``out_dir``; return the paths written."""
    target = pick_layers_target(comp, layers_target)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if plots:
        from prunebench.commands.compare import plots as P

        layers, notes = load_layers(client, comp.cells[comp.cells["target"] == target])
        comp.notes.extend(notes)
        written.append(P.plot_tradeoff(comp.table, out_dir / "tradeoff.png"))
        if not layers.empty:
            written.append(P.plot_layer_channels(layers, target, out_dir / "layers.png"))
        norms, notes = load_norms(client, comp.cells[comp.cells["target"] == target])
        comp.notes.extend(notes)
        if not norms.empty:
            written.append(P.plot_sparsity_norms(norms, target, out_dir / "sparsity_norms.png"))
        history = load_history(client, pd.concat([comp.cells, comp.controls], ignore_index=True)
                               if len(comp.controls) else comp.cells)
        if history.empty:
            comp.notes.append("no per-epoch metrics logged: no training curves")
        else:
            written.extend(P.plot_training_curves(history, stage_epochs(comp.cells), out_dir / "curves"))
    for fmt, name in OUT_FILES.items():  # tables last, so they carry the notes the plots added
        path = out_dir / name
        path.write_text(render(comp, fmt), encoding="utf-8")
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``prunebench compare`` and its options."""
    p = subparsers.add_parser(
        "compare",
        help="side-by-side table, seed statistics and plots of runs read back from MLflow",
        description=(
            "Read the cells of `prunebench run` invocations (or of any runs that follow the prunebench tracking "
            "schema) back from MLflow and compare methods: mean ± sample sd and n over seeds of test top-1 and "
            "its per-seed differences to the dense model, to the dense model trained for the same extra epochs "
            "(when such control runs exist) and to the best method at the target, MACs, params, latency, speedup "
            "and the share of channels zeroed by sparsity training, with one dense and one dense-control row per "
            "model/dataset. Per target, the best method is starred and its lead over the runner-up is tested with "
            "a two-sided paired t-test on the per-seed differences (methods of a seed share the dense model and "
            "data order); Welch's t-test where the two seed sets differ."
        ),
        epilog=(
            "examples:\n"
            "  prunebench compare                                  # latest invocation of the only experiment\n"
            "  prunebench compare --experiment quickstart --out reports/quickstart\n"
            "  prunebench compare --all-runs --filter \"params.method != 'random'\" --format md\n"
            "  prunebench compare --run-id 3f2a... --format json > table.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sel = p.add_argument_group("selection")
    sel.add_argument("--tracking-uri", metavar="URI",
                     help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI})")
    sel.add_argument("--experiment", "-e", metavar="NAME",
                     help="experiment (the recipe's name); default: the only experiment besides Default")
    which = sel.add_mutually_exclusive_group()
    which.add_argument("--run-id", action="append", default=[], metavar="ID",
                       help="parent run of one `prunebench run` invocation (repeatable); default: the latest")
    which.add_argument("--all-runs", action="store_true",
                       help="every invocation of the experiment (a repeated cell counts once, its latest run)")
    sel.add_argument("--filter", metavar="EXPR", dest="filter_string",
                     help="MLflow filter string on the cell runs, e.g. \"params.method = 'oicsr'\" (dense "
                          "controls follow the seeds of the selected cells)")
    out = p.add_argument_group("output")
    out.add_argument("--format", "-f", choices=FORMATS, default="text",
                     help="what to print on stdout (default: an aligned text table)")
    out.add_argument("--out", type=Path, metavar="DIR",
                     help="also write table.md, table.csv, table.html, table.json and PNG plots into DIR")
    out.add_argument("--layers-target", type=float, metavar="T",
                     help="target of the per-layer channels and sorted-norms plots (default: the smallest target)")
    out.add_argument("--no-plots", action="store_true", help="with --out, write the tables only")
    out.add_argument("--alpha", type=float, default=0.05,
                     help="significance level of the t-test verdicts (default: 0.05)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``prunebench compare``: print the comparison and write ``--out``; returns the exit status."""
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha {args.alpha:g} must be between 0 and 1 (e.g. 0.05)")
    uri = resolve_uri(args.tracking_uri)  # the same default as `prunebench run`
    client = open_client(uri)
    selection = select(client, uri, args.experiment, args.run_id, args.all_runs, args.filter_string)
    comp = build(client, selection, args.alpha)
    written = []
    if args.out is not None:
        written = write_outputs(client, comp, args.out, args.layers_target, plots=not args.no_plots)
    elif args.layers_target is not None:
        pick_layers_target(comp, args.layers_target)  # still validate the value the user gave
    text = render(comp, args.format)
    print(text, end="" if text.endswith("\n") else "\n")
    if written and args.format == "text":
        print(f"\nwrote {len(written)} files to {args.out}: {', '.join(str(p.relative_to(args.out)) for p in written)}")
    return 0
