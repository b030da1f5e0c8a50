"""The comparison as one object: :func:`build` reads, cleans, aggregates and tests the selected runs into a
:class:`Comparison`, which every rendering (text, Markdown, CSV, HTML, JSON, plots) takes. The steps are
in :mod:`~prunebench.commands.compare.reading` and :mod:`~prunebench.commands.compare.statistics`;
docs/architecture.md places the command.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from mlflow.tracking import MlflowClient

from prunebench.commands.compare.reading import Selection, clean_cells, clean_controls, load_cells, load_controls
from prunebench.commands.compare.statistics import aggregate, significance
from prunebench.errors import UserError
from prunebench.timing import NOISY_SPEEDUP_SPREAD
from prunebench.tracking.schema import CELL_KIND, KIND_TAG


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
        hint = (
            "drop or loosen --filter"
            if sel.filter_string
            else "pick another invocation with --run-id, or take every invocation with --all-runs"
            if sel.parent_run_ids
            else f"check that the runs carry the tag {KIND_TAG}={CELL_KIND}"
        )
        raise UserError(f"no cell runs match ({sel.describe()}); {hint}")
    cells, notes = clean_cells(raw)
    if cells.empty:
        raise UserError(
            f"none of the {len(raw)} matching cell runs finished with a test_top1 metric "
            f"({sel.describe()}); {' '.join(notes)}"
        )
    controls, control_notes = clean_controls(load_controls(client, sel), cells)
    notes += control_notes
    if not sel.parent_run_ids and not sel.all_runs:
        notes.insert(0, "the experiment has no parent runs: every cell run in it is included")
    table = aggregate(cells, controls)
    tests = significance(cells, alpha)
    for t in tests.itertuples():
        hit = (
            (table["model"] == t.model)
            & (table["dataset"] == t.dataset)
            & (table["target"] == t.target)
            & (table["method_label"] == t.best)
        )
        table.loc[hit, ["test_vs_next", "p_vs_next"]] = [t.test if t.runner_up is not None else None, t.p_value]
    notes += speed_notes(cells, table)
    return Comparison(sel, cells, table, tests, notes, alpha, controls)


def speed_notes(cells: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """Notes on the speed columns: which speedups are noisy, and why some cells have no ONNX figures."""
    notes = []
    spreads = table[["speedup_spread", "onnx_speedup_spread"]].max(axis=1)
    noisy = table.loc[spreads > NOISY_SPEEDUP_SPREAD, "method_label"].dropna().unique().tolist()
    if noisy:
        notes.append(
            f"speedups marked noisy ({', '.join(noisy)}): the per-round ratios of dense and pruned latency "
            f"disagreed by more than {NOISY_SPEEDUP_SPREAD:.0%} (median absolute deviation): the machine's load or "
            "its timer changed from round to round; measure on a quiet machine (more measure.repeats steady the "
            "median ratio but do not lower its spread)"
        )
    failed = cells[cells["onnx_error"].notna()] if "onnx_error" in cells else cells.iloc[:0]
    if len(failed):
        reasons = "; ".join(sorted(failed["onnx_error"].astype(str).str.slice(0, 200).unique())[:3])
        notes.append(f"{len(failed)} cell(s) have no ONNX Runtime figures (n/a): {reasons}")
    return notes
