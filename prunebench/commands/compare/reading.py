"""Reading for ``prunebench compare``: which runs of an MLflow store to compare, as tidy frames.

1. **select** -- an experiment (the recipe's name), one or more parent runs (one per ``prunebench run``
   invocation; default the latest) and an optional MLflow filter string on the cell (child) runs;
2. **clean** -- cells that did not finish are left out (and counted in a note); when several invocations
   are combined, a cell repeated for the same (model, dataset, method, target, seed) keeps its latest run,
   so ``n`` counts seeds, never re-runs. Dense controls follow the same rules, one per (model, dataset,
   seed), for the seeds of the selected cells.

Only what the tracking schema promises (:mod:`prunebench.tracking.schema`, docs/tracking.md) is read, so
runs any tool logged by those names compare too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
from mlflow.entities import Experiment, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from prunebench.errors import UserError, close_matches, one_line
from prunebench.tracking import store
from prunebench.tracking.schema import (
    CELL_KIND,
    CONTROL_KIND,
    FINAL_METRICS,
    KIND_TAG,
    ONNX_ERROR_TAG,
    OPTIONAL_METRICS,
    PARENT_KIND,
    STAGES_TAG,
)

GROUP_KEYS = ["model", "dataset", "method_label", "target"]  # one row of the comparison table
CELL_KEYS = [*GROUP_KEYS, "seed"]  # one cell
CONTROL_KEYS = ["model", "dataset", "seed"]  # one dense control
CELL_COLUMNS = [
    "run_id",
    "parent_run_id",
    "status",
    "start_time",
    "model",
    "dataset",
    "method",
    "method_label",
    "seed",
    "target",
    "stage_epochs",
    "onnx_error",
    *FINAL_METRICS,
    *OPTIONAL_METRICS,
]


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


# --------------------------------------------------------------------------------------------------
# selection


def _local_store_path(uri: str) -> Path | None:
    """The file or folder a local tracking URI points at (None for servers)."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return None if path in ("", ":memory:") else Path(path)
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a plain path (or C:\...)
        return Path(uri)
    return None


def open_client(uri: str) -> MlflowClient:
    """A read-only client for ``uri``: a local store that does not exist is refused rather than created
    empty, and a server that does not answer is refused in seconds (:func:`prunebench.tracking.store.client`)."""
    path = _local_store_path(uri)
    if path is not None and not path.exists():
        where = "" if str(path.resolve()) in uri else f" ({path.resolve()})"
        raise UserError(
            f"no MLflow tracking store at {uri}{where}: it does not exist; run `prunebench run RECIPE` first, "
            "or point at the store with --tracking-uri or MLFLOW_TRACKING_URI"
        )
    return store.client(uri)


def _search_all(
    client: MlflowClient,
    experiment_id: str,
    filter_string: str,
    order_by: list[str] | None = None,
    max_results: int | None = None,
) -> list[Run]:
    """Every run matching ``filter_string``, following MLflow's pagination."""
    runs: list[Run] = []
    token: str | None = None
    page = 1000 if max_results is None else min(max_results, 1000)
    while True:
        try:
            batch = client.search_runs(
                [experiment_id], filter_string, max_results=page, order_by=order_by, page_token=token
            )
        except MlflowException as exc:
            raise UserError(
                f"MLflow rejected the run filter {filter_string!r}: {one_line(exc)} "
                "(use MLflow's syntax, e.g. --filter \"params.method = 'l1'\")"
            ) from None
        runs.extend(batch)
        token = batch.token
        if not token or (max_results is not None and len(runs) >= max_results):
            return runs


def list_experiments(client: MlflowClient, tracking_uri: str) -> list[Experiment]:
    """The store's active experiments; the first contact, so an unreachable store fails here, clearly."""
    try:
        return list(client.search_experiments())
    except (MlflowException, OSError) as exc:
        raise UserError(
            f"cannot read the tracking store at {tracking_uri} ({one_line(exc)}); start the server or "
            "fix --tracking-uri / MLFLOW_TRACKING_URI"
        ) from None


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


def _get_parents(client: MlflowClient, run_ids: Sequence[str], tracking_uri: str) -> list[Run]:
    parents: list[Run] = []
    for rid in run_ids:
        try:
            parents.append(client.get_run(rid))
        except MlflowException:
            raise UserError(
                f"run {rid!r} not found at {tracking_uri}; copy the parent run id from `mlflow ui`"
            ) from None
    return parents


def _check_parents(parents: Sequence[Run], exp: Experiment) -> None:
    """Every --run-id is a parent run (one invocation) of ``exp``, not a cell or a control."""
    for run in parents:
        if run.info.experiment_id != exp.experiment_id:
            raise UserError(f"run {run.info.run_id} is not in experiment {exp.name!r}; drop --experiment or the run id")
        kind = run.data.tags.get(KIND_TAG)
        if kind in (CELL_KIND, CONTROL_KIND):
            parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID, "?")
            what = "cell" if kind == CELL_KIND else "dense control"
            raise UserError(
                f"run {run.info.run_id} is a single {what}, not a `prunebench run` invocation; pass its parent "
                f"--run-id {parent}, or select cells with --filter"
            )


def select(
    client: MlflowClient,
    tracking_uri: str,
    experiment: str | None = None,
    run_ids: Sequence[str] = (),
    all_runs: bool = False,
    filter_string: str | None = None,
) -> Selection:
    """Resolve the command-line selection to an experiment and parent runs (without reading the cells)."""
    experiments = list_experiments(client, tracking_uri)
    parents = _get_parents(client, run_ids, tracking_uri)
    if experiment is None and parents:
        exp_ids = {r.info.experiment_id for r in parents}
        if len(exp_ids) > 1:
            raise UserError("the --run-id runs belong to different experiments; compare one experiment at a time")
        exp = client.get_experiment(exp_ids.pop())
    else:
        exp = pick_experiment(experiments, experiment, tracking_uri)
    _check_parents(parents, exp)
    sel = Selection(
        tracking_uri, exp.name, exp.experiment_id, [r.info.run_id for r in parents], filter_string, all_runs=all_runs
    )
    if parents or all_runs:
        if len(parents) == 1:
            sel.parent_started = _when(parents[0])
        return sel
    latest = _search_all(
        client,
        exp.experiment_id,
        f"tags.`{KIND_TAG}` = '{PARENT_KIND}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if latest:  # else no parent at all (cells logged by another tool): every cell of the experiment counts
        sel.parent_run_ids = [latest[0].info.run_id]
        sel.parent_started = _when(latest[0])
    return sel


# --------------------------------------------------------------------------------------------------
# cells and dense controls


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
        "parent_run_id": t.get(MLFLOW_PARENT_RUN_ID),
        "status": run.info.status,
        "start_time": run.info.start_time,
        "model": p.get("model", "?"),
        "dataset": p.get("dataset", "?"),
        "method": p.get("method"),
        "method_label": p.get("method_label") or p.get("method"),
        "seed": _number(p.get("seed"), int),
        "target": _number(p.get("target"), float),
        "stage_epochs": t.get(STAGES_TAG),
        "onnx_error": t.get(ONNX_ERROR_TAG),
    }
    row.update({k: m.get(k, math.nan) for k in (*FINAL_METRICS, *OPTIONAL_METRICS)})
    return row


def _load_kind(client: MlflowClient, sel: Selection, kind: str, filter_string: str | None) -> pd.DataFrame:
    """Every run tagged ``kind`` under the selected parent run(s) (any status), one row each, oldest first."""
    filt = f"tags.`{KIND_TAG}` = '{kind}'"
    if len(sel.parent_run_ids) == 1:  # let the store do the narrowing in the common case
        filt += f" and tags.`{MLFLOW_PARENT_RUN_ID}` = '{sel.parent_run_ids[0]}'"
    if filter_string:
        filt += f" and {filter_string}"
    runs = _search_all(client, sel.experiment_id, filt)
    rows = pd.DataFrame([_cell_row(r) for r in runs], columns=CELL_COLUMNS)
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


def _describe_cells(cells: pd.DataFrame, limit: int = 4) -> str:
    items = [
        f"{r.method_label} seed {r.seed} target {r.target:g}"
        if pd.notna(r.target)
        else f"{r.method_label} seed {r.seed}"
        if pd.notna(r.seed)
        else str(r.run_id)
        for r in cells.head(limit).itertuples()
    ]
    more = f", ... ({len(cells)} in all)" if len(cells) > limit else ""
    return ", ".join(items) + more


def _unfinished_note(runs: pd.DataFrame, what: str) -> list[str]:
    unfinished = runs[runs["status"] != "FINISHED"]
    if not len(unfinished):
        return []
    counts = ", ".join(f"{n} {s}" for s, n in unfinished["status"].value_counts().sort_index().items())
    return [f"{len(unfinished)} {what} not finished and left out ({counts}): {_describe_cells(unfinished)}"]


def clean_cells(cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Finished, well-formed cells, one per (model, dataset, method label, target, seed); plus notes.

    Unfinished cells would bias the means toward whatever finished first, so they are left out and
    counted. A cell repeated across invocations keeps its latest run so that ``n`` counts seeds.
    """
    notes = _unfinished_note(cells, "cell(s)")
    done = cells[cells["status"] == "FINISHED"]
    bad = done[done[["method_label", "seed", "target"]].isna().any(axis=1)]
    if len(bad):
        notes.append(
            f"{len(bad)} finished run(s) without the method/seed/target params left out: "
            f"{', '.join(bad['run_id'].head(4))}"
        )
        done = done.drop(bad.index)
    no_top1 = done[done["test_top1"].isna()]
    if len(no_top1):
        notes.append(f"{len(no_top1)} finished cell(s) without a test_top1 metric left out: {_describe_cells(no_top1)}")
        done = done.drop(no_top1.index)
    deduped = done.drop_duplicates(subset=CELL_KEYS, keep="last")
    if len(deduped) < len(done):
        notes.append(
            f"{len(done) - len(deduped)} repeated cell(s) (same method, target and seed in several "
            "invocations) counted once, from the latest run"
        )
    return deduped.astype({"seed": int, "target": float}).reset_index(drop=True), notes


def clean_controls(controls: pd.DataFrame, cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Finished dense controls of the cells' (model, dataset, seed)s, the latest run of each; plus notes."""
    notes = _unfinished_note(controls, "dense control run(s)")
    done = controls[(controls["status"] == "FINISHED") & controls["seed"].notna()]
    no_top1 = done[done["test_top1"].isna()]
    if len(no_top1):
        notes.append(
            f"{len(no_top1)} finished dense control run(s) without a test_top1 metric left out: "
            f"{_describe_cells(no_top1)}"
        )
        done = done.drop(no_top1.index)
    done = done.astype({"seed": int}).merge(cells[CONTROL_KEYS].drop_duplicates(), on=CONTROL_KEYS)
    deduped = done.drop_duplicates(subset=CONTROL_KEYS, keep="last")
    if len(deduped) < len(done):
        notes.append(
            f"{len(done) - len(deduped)} repeated dense control run(s) (same seed) counted once, from the latest run"
        )
    return deduped.reset_index(drop=True), notes
