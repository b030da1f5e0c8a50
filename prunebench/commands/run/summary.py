"""What ``prunebench run`` returns and prints at the end: one :class:`CellResult` per cell (and per dense
control), the :class:`RunSummary` of the invocation and its closing table (:func:`format_summary`), and
the parent run's description in MLflow (:func:`set_parent_note`: the comparison table of ``prunebench
compare``). The metrics themselves are described in docs/tracking.md."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from math import nan

from tabulate import tabulate

from prunebench.commands.compare import comparison_note
from prunebench.commands.compare.publish import NOTE_MAX_CHARS
from prunebench.commands.run.phases import CONTROL_LABEL
from prunebench.errors import UserError, one_line
from prunebench.timing import speedup_text
from prunebench.tracking import runs
from prunebench.tracking.schema import NOTE_TAG

log = logging.getLogger(__name__)

_HEADERS = ("method", "seed", "target", "top1", "dense", "MACs(M)", "red.", "params(M)", "speedup", "ONNX", "zeroed")
_ALIGN = ("left", *("right",) * (len(_HEADERS) - 1), "left")


@dataclass
class CellResult:
    """The final figures of one cell (what the closing table prints)."""

    method: str
    seed: int
    target: float
    run_id: str
    status: str = "FINISHED"
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    skipped: bool = False  # finished by an earlier invocation (``--resume``)
    control: bool = False  # a seed's dense control, not a cell of the grid

    def describe(self) -> str:
        return (
            f"{CONTROL_LABEL} seed {self.seed}"
            if self.control
            else f"{self.method} seed {self.seed} target {self.target}"
        )


@dataclass
class RunSummary:
    parent_run_id: str
    experiment: str
    tracking_uri: str
    cells: list[CellResult]

    @property
    def failed(self) -> list[CellResult]:
        """Cells and dense controls that did not finish."""
        return [c for c in self.cells if c.status != "FINISHED"]

    @property
    def grid(self) -> list[CellResult]:
        """The cells of the grid (methods x seeds x targets), without the dense controls."""
        return [c for c in self.cells if not c.control]


def _row(c: CellResult) -> list[str]:
    """One line of the closing table: the figures, then a note (failed, or finished by an earlier run)."""
    m = c.metrics
    note = "(finished earlier)" if c.skipped else ""
    if c.status != "FINISHED":
        return [c.method, str(c.seed), f"{c.target:.2f}", *[""] * 8, f"{c.status}: {c.error}"]
    figures = [f"{100 * m['test_top1']:.2f}%", f"{100 * m['dense_test_top1']:.2f}%", f"{m['macs'] / 1e6:.2f}"]
    if c.control:
        return [c.method, str(c.seed), "-", *figures, f"{0:.3f}", f"{m['params'] / 1e6:.3f}", "", "", "", note]
    zeroed = f"{m['sparsity_zero_frac']:.0%}" if "sparsity_zero_frac" in m else ""
    return [
        c.method,
        str(c.seed),
        f"{c.target:.2f}",
        *figures,
        f"{m['macs_reduction']:.3f}",
        f"{m['params'] / 1e6:.3f}",
        speedup_text(m.get("speedup", nan), m.get("speedup_spread", nan)),
        speedup_text(m.get("onnx_speedup", nan), m.get("onnx_speedup_spread", nan)),
        zeroed,
        note,
    ]


def format_summary(summary: RunSummary) -> str:
    """The closing table of ``prunebench run`` (one line per cell), then where the runs are logged."""
    table = tabulate(
        [_row(c) for c in summary.cells], headers=[*_HEADERS, "note"], colalign=_ALIGN, disable_numparse=True
    )
    return (
        f"{table}\n\nMLflow: {summary.tracking_uri}  experiment {summary.experiment!r}  parent run "
        f"{summary.parent_run_id}\nCompare: prunebench compare --experiment {summary.experiment!r}"
    )


def parent_note(summary: RunSummary) -> str:
    """The parent run's description (Markdown): the comparison of its cells as ``prunebench compare`` renders
    it; when there is none (no cell finished), why, and the closing table of the run."""
    try:
        return comparison_note(summary.tracking_uri, summary.parent_run_id)
    except UserError as exc:
        why = str(exc)
    except Exception as exc:  # a comparison bug must not cost the run its description
        why = f"{type(exc).__name__}: {one_line(exc)}"
        log.warning("could not build the comparison table for the parent run's description (%s)", why)
    head = f"**No comparison table**: {why}\n\nThe cells of this run:\n\n"
    table = format_summary(summary)[: NOTE_MAX_CHARS - len(head) - 20]
    return f"{head}```\n{table}\n```\n"


def set_parent_note(summary: RunSummary) -> None:
    """Write :func:`parent_note` into the active (parent) run's description; a failure is a warning only:
    the cells are logged, the description is a convenience."""
    try:
        runs.set_tags({NOTE_TAG: parent_note(summary)})
    except Exception as exc:
        log.warning("could not write the parent run's description in MLflow (%s)", one_line(exc))
