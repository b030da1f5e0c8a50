"""What the plots of ``prunebench compare`` read beyond the final metrics, as tidy frames: each cell's
``layers.csv`` and ``sparsity_norms.json`` artifacts and its per-epoch metric histories (names from
:mod:`prunebench.tracking.schema`; the layout of runs and artifacts is in docs/tracking.md).

A missing or unreadable artifact never fails the command: the plot is drawn from the cells that have one
and the others are named in a note.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from prunebench.commands.compare.reading import CELL_KEYS
from prunebench.tracking.schema import EPOCH_METRICS, LAYERS_ARTIFACT, NORMS_ARTIFACT


def load_layers(client: MlflowClient, cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The ``layers.csv`` artifacts of ``cells`` stacked, tagged with the cell keys and the layer order."""
    frames, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, cell in enumerate(cells.itertuples()):
            try:
                path = client.download_artifacts(cell.run_id, LAYERS_ARTIFACT, os.path.join(tmp, str(i)))
                layers = pd.read_csv(path)
            except (MlflowException, OSError, pd.errors.ParserError):
                missing.append(cell.run_id)
                continue
            frames.append(layers.assign(order=range(len(layers)), **{k: getattr(cell, k) for k in CELL_KEYS}))
    notes = (
        [f"{len(missing)} cell(s) without a readable {LAYERS_ARTIFACT} artifact: {', '.join(missing[:4])}"]
        if missing
        else []
    )
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


def _norms_of(client: MlflowClient, run_id: str, dst: str) -> dict[str, np.ndarray] | None:
    """A cell's ``sparsity_norms.json`` as sorted arrays ``start`` and ``end``; None when it has none.

    Raises ValueError (with the run id) when the artifact is there but cannot be read.
    """
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
    with tempfile.TemporaryDirectory() as tmp:
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
                frames += [
                    pd.DataFrame({"stage": stage, "rank": np.arange(len(v)), "value": v}).assign(**keys)
                    for stage, v in norms.items()
                ]
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
        for key in EPOCH_METRICS
        for m in client.get_metric_history(cell.run_id, key)
    ]
    history = pd.DataFrame(rows, columns=["run_id", *CELL_KEYS, "metric", "step", "timestamp", "value"])
    history = history.sort_values("timestamp", kind="stable").drop_duplicates(["run_id", "metric", "step"])
    return history.drop(columns="timestamp").sort_values(["run_id", "metric", "step"]).reset_index(drop=True)


def stage_epochs(cells: pd.DataFrame) -> dict[str, list[int]]:
    """The stage step ranges of the first cell that has a readable stage-epochs tag (``STAGES_TAG``)."""
    for raw in cells["stage_epochs"].dropna():
        try:
            stages = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(stages, dict):
            return {str(k): list(v) for k, v in stages.items() if isinstance(v, list) and len(v) == 2}
    return {}
