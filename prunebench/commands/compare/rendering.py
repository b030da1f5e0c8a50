"""Rendering for ``prunebench compare``: one :class:`~prunebench.commands.compare.report.Comparison` as an
aligned terminal table, Markdown, CSV, HTML or JSON (:data:`FORMATS`). Text and Markdown tables go through
``tabulate``; the CSV and JSON tables keep every number unrounded with its unit in the column name.

The display shows mean ± sample sd over seeds, the best method per target starred, and one verdict per
target (docs/fairness.md says why the tests pair by seed).
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from prunebench.commands.compare.report import Comparison
from prunebench.commands.compare.statistics import PAIRED_TEST, TEST_NAME
from prunebench.timing import speedup_text

FORMATS = ("text", "md", "csv", "html", "json")
OUT_FILES = {"md": "table.md", "csv": "table.csv", "html": "table.html", "json": "table.json"}
# per-seed differences shown as mean ± sd (pp): display header -> column stem in the table
DIFF_COLUMNS = {"vs dense (pp)": "delta", "vs dense (same epochs, pp)": "vs_control", "vs best (pp)": "vs_best"}
# columns dropped from the display when every row is blank (e.g. no latency measured)
_OPTIONAL_DISPLAY = [
    "zeroed %",
    "conv+fc MACs (M)",
    "latency b=1 (ms)",
    "latency batch (ms)",
    "speedup",
    "ONNX batch (ms)",
    "ONNX speedup",
]
_LEFT = {"model", "dataset", "method"}


def _amount(x: float) -> str:
    """Counts in millions or milliseconds: enough digits for tiny models without noise for big ones."""
    if pd.isna(x):
        return ""
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def _speedup(x: float, spread: float) -> str:
    return "" if pd.isna(x) else speedup_text(float(x), float(spread) if pd.notna(spread) else math.nan)


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
    out["speedup"] = [_speedup(x, sp) for x, sp in zip(t["speedup"], t["speedup_spread"], strict=True)]
    out["ONNX batch (ms)"] = t["onnx_latency_ms_batch"].map(_amount)
    out["ONNX speedup"] = [_speedup(x, sp) for x, sp in zip(t["onnx_speedup"], t["onnx_speedup_spread"], strict=True)]
    if t["onnx_speedup"].notna().any():  # some cells were timed in ONNX Runtime: show the others' gap as such
        gap = t["onnx_speedup"].isna() & t["speedup"].notna()
        out.loc[gap, ["ONNX batch (ms)", "ONNX speedup"]] = "n/a"
    return out.loc[:, (out != "").any(axis=0) | ~out.columns.isin(_OPTIONAL_DISPLAY)].reset_index(drop=True)


def _colalign(frame: pd.DataFrame) -> list[str]:
    return ["left" if col in _LEFT else "right" for col in frame.columns]


def align(frame: pd.DataFrame) -> str:
    """Plain-text table with aligned columns (text left, numbers right) and a rule under the header."""
    return tabulate(
        frame.astype(str).values.tolist(),
        headers=list(frame.columns),
        tablefmt="simple",
        colalign=_colalign(frame),
        disable_numparse=True,
    )


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown pipe table with the same alignment as :func:`align`."""
    escaped = frame.astype(str).apply(lambda col: col.str.replace("|", "\\|").str.replace("*", "\\*"))
    return tabulate(
        escaped.values.tolist(),
        headers=list(escaped.columns),
        tablefmt="pipe",
        colalign=_colalign(escaped),
        disable_numparse=True,
    )


def title(comp: Comparison) -> str:
    """What is compared: model and dataset (when single), experiment and the number of cells."""
    t = comp.table
    what = (
        f"{t['model'].iloc[0]} on {t['dataset'].iloc[0]}"
        if _constant(t, "model") and _constant(t, "dataset")
        else "several models/datasets"
    )
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
        lines.append(
            f"{where}target {t.target:.2f}: {t.best} leads {t.runner_up} by {t.lead_pp:+.2f} pp "
            f"({_test_text(t)}): {t.verdict}"
        )
    return lines


def _test_text(t: Any) -> str:
    """The test in words: its name, n and, where it was computed, t and p."""
    n = f"n = {t.n} seeds" if t.test == PAIRED_TEST else f"n = {t.n_best} vs {t.n_runner_up} seeds"
    stat = f", t = {t.statistic:.3g}, p = {t.p_value:.3g}" if pd.notna(t.p_value) else ""
    return f"{t.test}, {n}{stat}"


def _legend(comp: Comparison) -> str:
    control = "" if len(comp.controls) else " (no dense-control runs in this selection)"
    return (
        f"* best mean test top-1 at its target. mean ± sample sd over seeds of per-seed values and of "
        f"per-seed differences (pp): 'vs dense' to the dense model of the same seed, 'vs dense (same epochs)' "
        f"to the dense model trained unpruned for the same extra epochs{control}, 'vs best' to the best method "
        f"at the target; 'zeroed' is the share of regularized channels below 5% of their layer's starting "
        f"median norm after sparsity training (mean over seeds). Significance: {TEST_NAME}, alpha {comp.alpha:g}."
    )


def to_text(comp: Comparison) -> str:
    """The terminal rendering: title, selection, aligned table, one verdict per target, notes."""
    parts = [title(comp), comp.selection.describe(), "", align(display_frame(comp)), "", _legend(comp), ""]
    parts += ["Best per target:", *(f"  {s}" for s in verdict_lines(comp))]
    if comp.notes:
        parts += ["", "Notes:", *(f"  {s}" for s in comp.notes)]
    return "\n".join(parts) + "\n"


def to_markdown(comp: Comparison) -> str:
    """Markdown for reports and READMEs: the same content as the terminal table."""
    parts = [
        f"### {title(comp)}",
        "",
        f"Selection: {comp.selection.describe()}",
        "",
        markdown_table(display_frame(comp)),
        "",
        _legend(comp).replace("*", "\\*", 1),
        "",
        "**Best per target**",
        "",
        *(f"- {s}" for s in verdict_lines(comp)),
    ]
    if comp.notes:
        parts += ["", "**Notes**", "", *(f"- {s}" for s in comp.notes)]
    return "\n".join(parts) + "\n"


def to_csv(comp: Comparison) -> str:
    """The machine-readable table (numbers unrounded, units in the column names)."""
    return comp.table.to_csv(index=False)


HTML_STYLE = (
    "body{font-family:sans-serif} table{border-collapse:collapse} td,th{padding:2px 8px;"
    "border-bottom:1px solid #ccc;text-align:right} td:first-child,th:first-child{text-align:left}"
)


def html_page(heading: str, body: str, style: str = HTML_STYLE) -> str:
    """A standalone HTML page around ``body``: inline style only, no external reference."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(heading)}</title>\n'
        f"<style>{style}</style></head><body>\n{body}</body></html>\n"
    )


def html_body(comp: Comparison) -> str:
    """The HTML of the comparison: title, selection, the display table, legend, tests and notes."""
    tests = comp.tests.rename(columns={"p_value": "p", "statistic": "t"})
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in comp.notes)
    return (
        f"<h3>{html.escape(title(comp))}</h3>\n<p>{html.escape(comp.selection.describe())}</p>\n"
        f"{display_frame(comp).to_html(index=False, escape=True)}\n<p>{html.escape(_legend(comp))}</p>\n"
        f"<h4>Best per target</h4>\n{tests.to_html(index=False, na_rep='', float_format='{:.4g}'.format)}\n"
        + (f"<h4>Notes</h4><ul>{notes}</ul>\n" if notes else "")
    )


def to_html(comp: Comparison) -> str:
    """A standalone HTML page: the display table, the tests and the notes."""
    return html_page("prunebench compare", html_body(comp))


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    # NaN -> null and numpy scalars -> plain numbers; full precision so tiny p-values do not round to 0
    return json.loads(frame.to_json(orient="records", double_precision=15))


def to_json(comp: Comparison) -> str:
    """Everything, machine-readable: selection, table rows, tests, the cells and controls used, the notes."""
    cells = comp.cells.drop(columns=["stage_epochs"])
    controls = comp.controls.drop(columns=["stage_epochs"], errors="ignore")
    doc = {
        "selection": {
            "tracking_uri": comp.selection.tracking_uri,
            "experiment": comp.selection.experiment,
            "parent_run_ids": comp.selection.parent_run_ids,
            "filter": comp.selection.filter_string,
        },
        "units": {
            "top1_pct": "percent",
            "delta_pp": "percentage points",
            "vs_control_pp": "percentage points",
            "vs_best_pp": "percentage points",
            "macs_M": "millions of multiply-adds",
            "params_M": "millions",
            "latency_ms": "milliseconds (batch 1)",
            "latency_ms_batch": "milliseconds (larger batch)",
            "onnx_latency_ms": "milliseconds in ONNX Runtime (batch 1)",
            "onnx_latency_ms_batch": "milliseconds in ONNX Runtime (larger batch)",
            "speedup": "dense / pruned latency at the larger batch, median of per-round ratios",
            "speedup_spread": "median absolute deviation / median of those ratios (worst seed)",
            "sparsity_zero_pct": "percent of the regularized channels",
            "std": "sample standard deviation (ddof=1)",
        },
        "test": TEST_NAME,
        "alpha": comp.alpha,
        "rows": _records(comp.table),
        "significance": _records(comp.tests),
        "cells": _records(cells),
        "controls": _records(controls),
        "notes": comp.notes,
    }
    return json.dumps(doc, indent=2) + "\n"


RENDERERS = {"text": to_text, "md": to_markdown, "csv": to_csv, "html": to_html, "json": to_json}


def render(comp: Comparison, fmt: str) -> str:
    """The comparison in one of :data:`FORMATS`."""
    return RENDERERS[fmt](comp)
