"""``prunebench compare``: read cells back from MLflow and lay them side by side.

The comparison is built only from what the tracking schema (design.md, "Tracking schema") promises, so
it works on runs that any tool logged by those names, not just on ``prunebench run``'s:

1. **select** -- an experiment (the recipe's name), one or more parent runs (one per ``prunebench run``
   invocation; default the latest) and an optional MLflow filter string on the cell (child) runs;
2. **clean** -- cells that did not finish are left out (and counted in a note); when several invocations
   are combined, a cell repeated for the same (model, dataset, method, target, seed) keeps its latest
   run, so ``n`` counts seeds, never re-runs;
3. **aggregate** -- one row per (model, dataset, method label, target): mean, sample standard deviation
   (ddof=1, blank for n=1) and n of test top-1 and of its per-seed change from the dense model of the same
   seed, plus MACs, parameters, latency and speedup; one dense row per (model, dataset);
4. **judge** -- per target, the best method by mean test top-1 and a two-sided Welch's t-test of its lead
   over the runner-up on the per-seed values (no statement at all with fewer than two seeds a side);
5. **render** -- an aligned terminal table, Markdown, CSV, HTML or JSON; ``--out DIR`` writes every format
   plus the plots of :mod:`prunebench.plots`.

Top-1 values are stored as fractions and shown as percentages; changes from dense are percentage points.
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
from prunebench.tracking import DEFAULT_URI, KIND_TAG, STAGES_TAG, resolve_uri

if TYPE_CHECKING:  # mlflow is slow to import; only the commands that read runs pay for it
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
GROUP_KEYS = ["model", "dataset", "method_label", "target"]
CELL_KEYS = [*GROUP_KEYS, "seed"]
FINAL_METRICS = (
    "test_top1", "val_top1", "dense_test_top1", "macs", "macs_conv_fc", "macs_dense", "macs_reduction",
    "params", "params_reduction", "params_dense", "latency_ms", "latency_ms_batch", "speedup",
)
# Logged by `prunebench run` beyond the schema's minimum; used for the dense row when present.
OPTIONAL_METRICS = ("macs_conv_fc_dense", "dense_latency_ms", "dense_latency_ms_batch")
CURVE_METRICS = ("train_loss", "train_penalty", "train_top1", "val_top1", "lr")
FORMATS = ("text", "md", "csv", "html", "json")
OUT_FILES = {"md": "table.md", "csv": "table.csv", "html": "table.html", "json": "table.json"}
TEST_NAME = "two-sided Welch's t-test (unequal variances) on per-seed test top-1"

# Columns of the machine-readable table (CSV/JSON), in order; units are in the names.
TABLE_COLUMNS = [
    "model", "dataset", "kind", "method", "method_label", "target", "n",
    "top1_pct", "top1_pct_std", "delta_pp", "delta_pp_std",
    "macs_M", "macs_conv_fc_M", "macs_reduction_pct", "params_M", "params_reduction_pct",
    "latency_ms", "latency_ms_batch", "speedup", "rank", "p_vs_next",
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
        if run.data.tags.get(KIND_TAG) == "cell":
            parent = run.data.tags.get(PARENT_TAG, "?")
            raise UserError(
                f"run {run.info.run_id} is a single cell, not a `prunebench run` invocation; pass its parent "
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


def load_cells(client: MlflowClient, sel: Selection) -> pd.DataFrame:
    """Every cell run of the selection (any status), one row each, oldest first."""
    filt = f"tags.`{KIND_TAG}` = 'cell'"
    if len(sel.parent_run_ids) == 1:  # let the store do the narrowing in the common case
        filt += f" and tags.`{PARENT_TAG}` = '{sel.parent_run_ids[0]}'"
    if sel.filter_string:
        filt += f" and {sel.filter_string}"
    runs = _search_all(client, sel.experiment_id, filt)
    cells = pd.DataFrame([_cell_row(r) for r in runs], columns=[*_cell_row_columns()])
    if len(sel.parent_run_ids) > 1:
        cells = cells[cells["parent_run_id"].isin(sel.parent_run_ids)]
    return cells.sort_values("start_time", kind="stable").reset_index(drop=True)


def _cell_row_columns() -> list[str]:
    return ["run_id", "parent_run_id", "status", "start_time", "model", "dataset", "method", "method_label",
            "seed", "target", "stage_epochs", *FINAL_METRICS, *OPTIONAL_METRICS]


def _describe_cells(cells: pd.DataFrame, limit: int = 4) -> str:
    items = [f"{r.method_label} seed {r.seed} target {r.target:g}" if pd.notna(r.target) else str(r.run_id)
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


def aggregate(cells: pd.DataFrame) -> pd.DataFrame:
    """The comparison table: one row per (model, dataset, method label, target) and one dense row each.

    Rows are ordered dense first, then by target, then best mean test top-1 first; ``rank`` is 1 for the
    best method at its target. Standard deviations are sample standard deviations (blank for n = 1).
    """
    v = _per_cell_values(cells)
    methods = (
        v.groupby(GROUP_KEYS, sort=False)
        .agg(method=("method", "first"), n=("top1", "count"), top1_pct=("top1", "mean"),
             top1_pct_std=("top1", "std"), delta_pp=("delta", "mean"), delta_pp_std=("delta", "std"),
             macs_M=("macs_M", "mean"), macs_conv_fc_M=("macs_conv_fc_M", "mean"),
             macs_reduction_pct=("macs_red", "mean"), params_M=("params_M", "mean"),
             params_reduction_pct=("params_red", "mean"), latency_ms=("latency_ms", "mean"),
             latency_ms_batch=("latency_ms_batch", "mean"), speedup=("speedup", "mean"))
        .reset_index()
        .assign(kind="pruned")
    )
    methods["rank"] = (
        methods.groupby(["model", "dataset", "target"])["top1_pct"].rank(ascending=False, method="min").astype("Int64")
    )
    dense = _dense_rows(v)
    table = pd.concat([dense, methods] if len(dense) else [methods], ignore_index=True)
    table = table.sort_values(["model", "dataset", "kind", "target", "top1_pct"],  # "dense" < "pruned"
                              ascending=[True, True, True, True, False], kind="stable", na_position="first")
    table["p_vs_next"] = math.nan
    return table.reindex(columns=TABLE_COLUMNS).reset_index(drop=True)


def significance(cells: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per (model, dataset, target): the best method, its lead over the runner-up and a Welch's t-test.

    The test is two-sided on the per-seed test top-1 values of the two methods; its p-value says how often
    seed noise alone would give a lead at least this large. With fewer than two seeds on either side there
    is no estimate of the noise, so no statement is made.
    """
    from scipy import stats

    rows = []
    for (model, dataset, target), grp in cells.groupby(["model", "dataset", "target"], sort=True):
        samples = {k: g["test_top1"].to_numpy() * 100 for k, g in grp.groupby("method_label")}
        ranked = sorted(samples, key=lambda k: -samples[k].mean())
        best = ranked[0]
        row: dict[str, Any] = {"model": model, "dataset": dataset, "target": target, "best": best,
                               "runner_up": None, "best_top1_pct": samples[best].mean(), "runner_up_top1_pct": math.nan,
                               "lead_pp": math.nan, "n_best": len(samples[best]), "n_runner_up": 0,
                               "test": TEST_NAME, "p_value": math.nan}
        if len(ranked) == 1:
            row["verdict"] = "only one method at this target: nothing to compare"
            rows.append(row)
            continue
        a, b = samples[best], samples[ranked[1]]
        row.update(runner_up=ranked[1], runner_up_top1_pct=b.mean(), lead_pp=a.mean() - b.mean(), n_runner_up=len(b))
        if min(len(a), len(b)) < 2:
            row["verdict"] = "n < 2 on one side: no significance statement is possible"
        elif a.var() == 0 and b.var() == 0:  # t = lead / 0: scipy says p = 0, which would overstate certainty
            row["verdict"] = "no seed-to-seed variation on either side: Welch's t-test is undefined"
        else:
            with warnings.catch_warnings():  # "precision loss" for nearly identical seeds; the p-value stands
                warnings.simplefilter("ignore", RuntimeWarning)
                p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
            row["p_value"] = p
            if math.isnan(p):
                row["verdict"] = "the t-test is undefined for these values"
            elif p < alpha:
                row["verdict"] = f"lead larger than seed noise (p < {alpha:g})"
            else:
                row["verdict"] = f"lead within seed noise (p >= {alpha:g})"
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# the comparison as one object


@dataclass
class Comparison:
    """Everything a rendering needs: the selection, the cells used, the table, the tests and the notes."""

    selection: Selection
    cells: pd.DataFrame
    table: pd.DataFrame
    tests: pd.DataFrame
    notes: list[str]
    alpha: float = 0.05


def build(client: MlflowClient, sel: Selection, alpha: float = 0.05) -> Comparison:
    """Read, clean, aggregate and test the selected cells; a clear UserError when nothing is left."""
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
    if not sel.parent_run_ids and not sel.all_runs:
        notes.insert(0, "the experiment has no parent runs: every cell run in it is included")
    table = aggregate(cells)
    tests = significance(cells, alpha)
    for t in tests.itertuples():
        hit = (table["model"] == t.model) & (table["dataset"] == t.dataset) & (table["target"] == t.target) & (
            table["method_label"] == t.best)
        table.loc[hit, "p_vs_next"] = t.p_value
    return Comparison(sel, cells, table, tests, notes, alpha)


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
    out["vs dense (pp)"] = [_mean_sd(m, s, signed=True) for m, s in zip(t["delta_pp"], t["delta_pp_std"], strict=True)]
    out["MACs (M)"] = t["macs_M"].map(_amount)
    out["conv+fc MACs (M)"] = t["macs_conv_fc_M"].map(_amount)
    out["MACs red. %"] = t["macs_reduction_pct"].map(lambda x: "" if pd.isna(x) else f"{x:.1f}")
    out["params (M)"] = t["params_M"].map(_amount)
    out["params red. %"] = t["params_reduction_pct"].map(lambda x: "" if pd.isna(x) else f"{x:.1f}")
    out["latency b=1 (ms)"] = t["latency_ms"].map(_amount)
    out["latency batch (ms)"] = t["latency_ms_batch"].map(_amount)
    out["speedup"] = t["speedup"].map(lambda x: "" if pd.isna(x) else f"{x:.2f}x")
    return out.loc[:, (out != "").any(axis=0) | ~out.columns.isin(_OPTIONAL_DISPLAY)].reset_index(drop=True)


# columns dropped from the display when every row is blank (e.g. no latency measured)
_OPTIONAL_DISPLAY = ["conv+fc MACs (M)", "latency b=1 (ms)", "latency batch (ms)", "speedup"]
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
    return f"{what}: {len(comp.cells)} cells, {seeds} seed(s) (experiment {comp.selection.experiment!r})"


def verdict_lines(comp: Comparison) -> list[str]:
    """One sentence per target: who leads, by how much, and whether that exceeds seed noise."""
    lines = []
    several = not (_constant(comp.table, "model") and _constant(comp.table, "dataset"))
    for t in comp.tests.itertuples():
        where = f"{t.model}/{t.dataset} " if several else ""
        if t.runner_up is None:
            lines.append(f"{where}target {t.target:.2f}: {t.best} ({t.verdict})")
            continue
        p = f", p = {t.p_value:.3g}" if pd.notna(t.p_value) else ""
        lines.append(f"{where}target {t.target:.2f}: {t.best} leads {t.runner_up} by {t.lead_pp:+.2f} pp "
                     f"(n = {t.n_best} vs {t.n_runner_up}{p}): {t.verdict}")
    return lines


def _legend(comp: Comparison) -> str:
    return (f"* best mean test top-1 at its target. mean ± sample sd over seeds; 'vs dense' is the per-seed "
            f"change from the dense model of the same seed. Significance: {TEST_NAME}, alpha {comp.alpha:g}.")


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
    tests = comp.tests.drop(columns=["test"]).rename(columns={"p_value": "p"})
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
    """Everything, machine-readable: selection, table rows, tests, the cells used and the notes."""
    cells = comp.cells.drop(columns=["stage_epochs"])
    doc = {
        "selection": {"tracking_uri": comp.selection.tracking_uri, "experiment": comp.selection.experiment,
                      "parent_run_ids": comp.selection.parent_run_ids, "filter": comp.selection.filter_string},
        "units": {"top1_pct": "percent", "delta_pp": "percentage points", "macs_M": "millions of multiply-adds",
                  "params_M": "millions", "latency_ms": "milliseconds (batch 1)",
                  "latency_ms_batch": "milliseconds (larger batch)", "std": "sample standard deviation (ddof=1)"},
        "test": TEST_NAME, "alpha": comp.alpha,
        "rows": _records(comp.table), "significance": _records(comp.tests), "cells": _records(cells),
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
        from prunebench import plots as P

        layers, notes = load_layers(client, comp.cells[comp.cells["target"] == target])
        comp.notes.extend(notes)
        written.append(P.plot_tradeoff(comp.table, out_dir / "tradeoff.png"))
        if not layers.empty:
            written.append(P.plot_layer_channels(layers, target, out_dir / "layers.png"))
        history = load_history(client, comp.cells)
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
            "its change from the dense model of the same seed, MACs, params, latency and speedup, with one "
            "dense row per model/dataset. Per target, the best method is starred and its lead over the "
            "runner-up is tested with a two-sided Welch's t-test on the per-seed values."
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
                     help="MLflow filter string on the cell runs, e.g. \"params.method = 'oicsr'\"")
    out = p.add_argument_group("output")
    out.add_argument("--format", "-f", choices=FORMATS, default="text",
                     help="what to print on stdout (default: an aligned text table)")
    out.add_argument("--out", type=Path, metavar="DIR",
                     help="also write table.md, table.csv, table.html, table.json and PNG plots into DIR")
    out.add_argument("--layers-target", type=float, metavar="T",
                     help="target of the per-layer channels plot (default: the smallest target)")
    out.add_argument("--no-plots", action="store_true", help="with --out, write the tables only")
    out.add_argument("--alpha", type=float, default=0.05,
                     help="significance level of the Welch's t-test verdict (default: 0.05)")
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
