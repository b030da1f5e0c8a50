"""Results where users look: the comparison put back into MLflow, next to the runs it describes.

* :func:`comparison_note` -- the Markdown comparison of one ``prunebench run`` invocation, sized for the
  parent run's description (``schema.NOTE_TAG``, what MLflow's UI shows on the run's page);
* :func:`log_outputs` -- the files of ``prunebench compare --out`` logged as artifacts of the selected parent
  run(s), under ``schema.COMPARE_ARTIFACT_DIR``. A store that refuses the write is a note, not an error: the
  files on disk are what the user asked for.

docs/tracking.md lists both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mlflow.tracking import MlflowClient

from prunebench.commands.compare.reading import open_client, select
from prunebench.commands.compare.rendering import render
from prunebench.commands.compare.report import Comparison, build
from prunebench.errors import one_line
from prunebench.tracking.schema import COMPARE_ARTIFACT_DIR
from prunebench.tracking.store import retry

log = logging.getLogger(__name__)

NOTE_MAX_CHARS = 8000  # MLflow's limit on a tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH)


def fit_note(text: str, more: str, limit: int = NOTE_MAX_CHARS) -> str:
    """``text`` cut at a line boundary to fit ``limit`` characters, ending with ``more`` (where the rest is)."""
    if len(text) <= limit:
        return text
    tail = f"\n\n_(truncated to fit the run description: {more})_\n"
    head = text[: limit - len(tail)]
    return head[: head.rfind("\n") + 1].rstrip() + tail


def comparison_note(tracking_uri: str, parent_run_id: str, alpha: float = 0.05) -> str:
    """The Markdown comparison of the cells under ``parent_run_id``, at most :data:`NOTE_MAX_CHARS` long.

    Raises UserError when no cell of that run finished (there is nothing to compare).
    """
    client = open_client(tracking_uri)
    comp = build(client, select(client, tracking_uri, run_ids=[parent_run_id]), alpha)
    more = f"the whole table is `prunebench compare --run-id {parent_run_id}`"
    text = render(comp, "md")
    if len(text) > NOTE_MAX_CHARS and comp.notes:  # the table matters more than the notes
        comp.notes = [f"{len(comp.notes)} note(s) left out for length"]
        text = render(comp, "md")
    return fit_note(text, more)


def target_runs(comp: Comparison) -> list[str]:
    """The parent runs the comparison's files belong to: those selected, or with ``--all-runs`` the parents
    of the cells compared. Empty when the cells have no parent run (logged by another tool)."""
    if comp.selection.parent_run_ids:
        return list(comp.selection.parent_run_ids)
    if comp.selection.all_runs and "parent_run_id" in comp.cells:
        return sorted(str(r) for r in comp.cells["parent_run_id"].dropna().unique())
    return []


def unlogged_note(out_dir: Path) -> str:
    """The note of a selection without parent runs: there is no run to log the files to."""
    return f"the selection has no parent run: the files in {out_dir} were not logged to MLflow"


def log_outputs(
    client: MlflowClient, parents: Sequence[str], out_dir: Path, written: Sequence[Path]
) -> tuple[list[str], list[str]]:
    """Log ``written`` (files under ``out_dir``) to each of ``parents`` under ``compare/``, with the
    sub-folders as written. Returns the runs logged to and a note for each run that refused the files."""
    logged, notes = [], []
    for run_id in parents:
        try:
            for path in written:
                rel = path.relative_to(out_dir).parent
                folder = COMPARE_ARTIFACT_DIR if rel == Path(".") else f"{COMPARE_ARTIFACT_DIR}/{rel.as_posix()}"
                retry(client.log_artifact, run_id, str(path), folder)
        except Exception as exc:  # a read-only store, a server without artifact access: the files are on disk
            notes.append(f"could not log the files to parent run {run_id} in MLflow ({one_line(exc, 300)})")
            log.warning("%s", notes[-1])
        else:
            logged.append(run_id)
    return logged, notes
