"""``prunebench compare``: read cells back from MLflow and lay them side by side.

:func:`compare` takes a :class:`CompareConfig` and returns a :class:`Report`, in four steps, one module each:

* :mod:`~prunebench.commands.compare.reading` -- select an experiment and its invocation(s), read the cell
  and dense-control runs into tidy frames and leave out what did not finish (counted in notes);
* :mod:`~prunebench.commands.compare.statistics` -- mean ± sample sd over seeds, per-seed differences and a
  test of each target's lead (:mod:`~prunebench.commands.compare.report` holds the result together);
* :mod:`~prunebench.commands.compare.rendering` -- text, Markdown, CSV, HTML or JSON;
* :mod:`~prunebench.commands.compare.plots` -- PNG figures from the tidy frames of
  :mod:`~prunebench.commands.compare.artifacts` (``--out DIR``), gathered with the table into one
  self-contained ``report.html`` by :mod:`~prunebench.commands.compare.html_report`;
* :mod:`~prunebench.commands.compare.publish` -- the files of ``--out`` logged to the selected parent run(s),
  and the Markdown table ``prunebench run`` puts in its parent run's description.

The command line is in :mod:`prunebench.cli.compare`. docs/tracking.md lists what is read; docs/fairness.md
why the statistics pair methods by seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from prunebench.commands.compare import plots
from prunebench.commands.compare.artifacts import load_history, load_layers, load_norms, stage_epochs
from prunebench.commands.compare.html_report import write_report
from prunebench.commands.compare.publish import comparison_note, log_outputs, target_runs, unlogged_note
from prunebench.commands.compare.reading import Selection, open_client, select
from prunebench.commands.compare.rendering import FORMATS, OUT_FILES, render
from prunebench.commands.compare.report import Comparison, build
from prunebench.errors import UserError
from prunebench.files import atomic_write_text
from prunebench.tracking.store import resolve_uri

__all__ = [
    "FORMATS",
    "CompareConfig",
    "Comparison",
    "Report",
    "Selection",
    "compare",
    "comparison_note",
    "write_outputs",
]


@dataclass
class CompareConfig:
    """What to compare and how to show it (the options of ``prunebench compare``)."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else the SQLite default (as `prunebench run`)
    experiment: str | None = None  # None: the only experiment besides Default
    run_ids: Sequence[str] = ()  # parent runs, one per invocation; empty: the latest (or every, with all_runs)
    all_runs: bool = False
    filter_string: str | None = None  # MLflow filter string on the cell runs
    format: str = "text"  # one of FORMATS: what Report.text holds
    out: Path | None = None  # also write every table format and the plots here
    layers_target: float | None = None  # target of the per-layer and norms plots; None: the smallest
    plots: bool = True  # with out: the PNG plots besides the tables
    log: bool = True  # with out: log the files to the selected parent run(s) under compare/
    alpha: float = 0.05  # significance level of the verdicts


@dataclass
class Report:
    """The comparison, rendered in the asked format, and the files written into ``out``."""

    comparison: Comparison
    text: str
    written: list[Path] = field(default_factory=list)
    logged_to: list[str] = field(default_factory=list)  # parent runs the written files were logged to


def compare(config: CompareConfig) -> Report:
    """Select, read, aggregate, test and render; write ``config.out`` when given and log its files to the
    selected parent run(s) (``config.log``)."""
    if config.format not in FORMATS:
        raise UserError(f"format {config.format!r} is not one of {', '.join(FORMATS)}")
    if not 0 < config.alpha < 1:
        raise UserError(f"--alpha {config.alpha:g} must be between 0 and 1 (e.g. 0.05)")
    uri = resolve_uri(config.tracking_uri)  # the same default as `prunebench run`
    client = open_client(uri)
    selection = select(client, uri, config.experiment, config.run_ids, config.all_runs, config.filter_string)
    comp = build(client, selection, config.alpha)
    written: list[Path] = []
    logged: list[str] = []
    if config.out is not None:
        parents = target_runs(comp) if config.log else []
        if config.log and not parents:
            comp.notes.append(unlogged_note(config.out))  # cells logged by another tool: no run to log to
        written = write_outputs(client, comp, config.out, config.layers_target, with_plots=config.plots)
        if parents:
            logged = publish_outputs(client, comp, parents, config.out, written)
    elif config.layers_target is not None:
        pick_layers_target(comp, config.layers_target)  # still validate the value the user gave
    return Report(comp, render(comp, config.format), written, logged)


def pick_layers_target(comp: Comparison, wanted: float | None) -> float:
    """``--layers-target`` if it was run, else the smallest target of the selection."""
    targets = sorted(comp.cells["target"].unique())
    if wanted is None:
        return targets[0]
    hits = [t for t in targets if math.isclose(t, wanted, abs_tol=1e-9)]
    if not hits:
        raise UserError(
            f"--layers-target {wanted:g} was not run in this selection; targets: {', '.join(f'{t:g}' for t in targets)}"
        )
    return hits[0]


def _write_plots(client: MlflowClient, comp: Comparison, out_dir: Path, target: float) -> list[Path]:
    """The PNG plots; what could not be drawn is added to ``comp.notes``."""
    at_target = comp.cells[comp.cells["target"] == target]
    written = [plots.plot_tradeoff(comp.table, out_dir / "tradeoff.png")]
    layers, notes = load_layers(client, at_target)
    comp.notes.extend(notes)
    if not layers.empty:
        written.append(plots.plot_layer_channels(layers, target, out_dir / "layers.png"))
    norms, notes = load_norms(client, at_target)
    comp.notes.extend(notes)
    if not norms.empty:
        written.append(plots.plot_sparsity_norms(norms, target, out_dir / "sparsity_norms.png"))
    runs = pd.concat([comp.cells, comp.controls], ignore_index=True) if len(comp.controls) else comp.cells
    history = load_history(client, runs)
    if history.empty:
        comp.notes.append("no per-epoch metrics logged: no training curves")
    else:
        written.extend(plots.plot_training_curves(history, stage_epochs(comp.cells), out_dir / "curves"))
    return written


def _write_documents(comp: Comparison, out_dir: Path, plots: list[Path]) -> list[Path]:
    """table.{md,csv,html,json} and report.html (with ``plots`` inlined); return the paths written."""
    written = []
    for fmt, name in OUT_FILES.items():
        atomic_write_text(out_dir / name, render(comp, fmt))
        written.append(out_dir / name)
    return [*written, write_report(comp, out_dir, plots)]


def write_outputs(
    client: MlflowClient, comp: Comparison, out_dir: Path, layers_target: float | None = None, with_plots: bool = True
) -> list[Path]:
    """Write the PNG plots, table.{md,csv,html,json} and report.html into ``out_dir``; return the paths written."""
    target = pick_layers_target(comp, layers_target)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _write_plots(client, comp, out_dir, target) if with_plots else []
    return [*plots, *_write_documents(comp, out_dir, plots)]  # tables last: they carry the plots' notes


def publish_outputs(
    client: MlflowClient, comp: Comparison, parents: list[str], out_dir: Path, written: list[Path]
) -> list[str]:
    """Log ``written`` to the ``parents`` runs under compare/; return the runs logged to.

    A run that refuses the files (a read-only store) is a warning and a note: the tables and report.html
    are written again with it, so the files on disk say that MLflow does not have them."""
    logged, notes = log_outputs(client, parents, out_dir, written)
    if notes:
        comp.notes.extend(notes)
        _write_documents(comp, out_dir, [p for p in written if p.suffix == ".png"])
    return logged
