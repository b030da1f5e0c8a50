"""The MLflow run lifecycle, shared by cells, dense controls, studies and trials, and the logging calls
the commands make inside a run. Names come from :mod:`prunebench.tracking.schema`; the layout of runs
(a parent per invocation, a nested run per cell) is described in docs/tracking.md.

Every run ends FINISHED, KILLED (an interrupt, or what the caller classifies as stopped, e.g. a pruned
trial) or FAILED (error tags and a ``traceback.txt`` artifact first). Only rank 0 of a distributed job
calls into MLflow: on the other ranks of a ``torchrun`` launch (:mod:`prunebench.distributed`) the runs are
placeholders carrying rank 0's run ids, the look-ups return rank 0's answers and the logging calls do nothing,
so every rank walks the same grid. Every call is retried while SQLite is busy (:func:`prunebench.tracking.store.retry`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import platform
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
from mlflow.entities import Run

from prunebench import distributed
from prunebench.errors import DivergedError, UserError
from prunebench.hostmem import allocator_state
from prunebench.tracking.schema import (
    CELL_KEY_TAG,
    CELL_KIND,
    ERROR_TAG,
    FAILURE_TAG,
    GIT_DIRTY_TAG,
    KIND_TAG,
    PARENT_KIND,
    RECIPE_ARTIFACT,
    RECIPE_KEY_TAG,
    RECIPE_TAG,
    TRACEBACK_ARTIFACT,
)
from prunebench.tracking.store import is_busy, retry

_PACKAGES = ("prunebench", "torch", "torchvision", "timm", "torch-pruning", "fvcore", "mlflow", "optuna", "pydantic")


def environment_tags() -> dict[str, str]:
    """Git commit of the prunebench checkout (when there is one) and package versions."""
    tags: dict[str, str] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host_allocator": allocator_state(),
    }
    for pkg in _PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            tags[f"version.{pkg}"] = version(pkg)
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        tags["mlflow.source.git.commit"] = commit
        tags[GIT_DIRTY_TAG] = str(bool(dirty)).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


@contextmanager
def tracked_run(
    run_name: str,
    *,
    run_id: str | None = None,
    nested: bool = False,
    stopped: Callable[[BaseException], bool] | None = None,
) -> Iterator[Run]:
    """Start (or reopen, with ``run_id``) a run; end it FINISHED when the block returns.

    An exception ends it KILLED when it is a KeyboardInterrupt (SIGINT/SIGTERM) or ``stopped(exc)`` says
    so (the caller tags why), else FAILED after :func:`record_failure`; the exception propagates. On a rank
    other than 0 of a ``torchrun`` launch: a placeholder with rank 0's run id, nothing written.
    """
    if not distributed.is_main():
        yield _placeholder(distributed.broadcast_object(None))
        return
    if run_id is None:
        run = retry(mlflow.start_run, run_name=run_name, nested=nested)
    else:
        run = retry(mlflow.start_run, run_id=run_id, nested=nested)
    distributed.broadcast_object(run.info.run_id)  # the other ranks' placeholders carry the same id
    try:
        yield run
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) or (stopped is not None and stopped(exc)):
            _end(run.info.run_id, "KILLED")
            raise
        try:
            record_failure(exc)
        except Exception as log_exc:  # the original error matters more than the failed bookkeeping
            exc.add_note(f"(recording this failure in MLflow failed too: {type(log_exc).__name__}: {log_exc})")
        _end(run.info.run_id, "FAILED")
        raise
    else:
        _end(run.info.run_id, "FINISHED")


def _placeholder(run_id: str) -> Any:
    """What a rank other than 0 holds for a run that rank 0 opened: its id, no data."""
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, status="RUNNING"), data=SimpleNamespace(tags={}, params={}, metrics={})
    )


def _end(run_id: str, status: str) -> None:
    """End the active run with ``status``. ``mlflow.end_run`` pops the run before it writes the status, so a
    busy store is retried on that run id, never by ending the next (parent) run."""
    try:
        mlflow.end_run(status)
    except Exception as exc:
        if not is_busy(exc):
            raise
        retry(mlflow.MlflowClient().set_terminated, run_id, status)


def record_failure(exc: BaseException) -> None:
    """Tag the active run with the error (``prunebench.error``, ``prunebench.failure``) and log the traceback."""
    kind = "diverged" if isinstance(exc, DivergedError) else "user-error" if isinstance(exc, UserError) else "error"
    set_tags({ERROR_TAG: f"{type(exc).__name__}: {exc}"[:4000], FAILURE_TAG: kind})
    log_text("".join(traceback.format_exception(exc)), TRACEBACK_ARTIFACT)


@contextmanager
def parent_run(
    recipe_name: str, run_name: str, recipe_yaml: str, *, recipe_key: str = "", run_id: str | None = None
) -> Iterator[Any]:
    """The run that groups one invocation's cells; ``run_id`` reopens an earlier one (``--resume``)."""
    with tracked_run(run_name, run_id=run_id) as run:
        if run_id is None:
            set_tags({KIND_TAG: PARENT_KIND, RECIPE_TAG: recipe_name, RECIPE_KEY_TAG: recipe_key, **environment_tags()})
            log_text(recipe_yaml, RECIPE_ARTIFACT)
        yield run


@contextmanager
def cell_run(
    run_name: str,
    params: Mapping[str, Any],
    recipe_name: str,
    *,
    cell_key: str = "",
    run_id: str | None = None,
    kind: str = CELL_KIND,
) -> Iterator[Any]:
    """A nested child run for one (method, seed, target) cell -- or, with ``kind="control"``, for a seed's
    dense control -- ``run_id`` reopens an unfinished one.

    Exceptions mark it FAILED (KILLED for an interrupt) and propagate.
    """
    with tracked_run(run_name, run_id=run_id, nested=True) as run:
        if not distributed.is_main():
            pass
        elif run_id is None:
            set_tags({KIND_TAG: kind, RECIPE_TAG: recipe_name, CELL_KEY_TAG: cell_key})
            retry(mlflow.log_params, {k: _param(v) for k, v in params.items()})
        else:  # a retried cell: the previous attempt's error no longer applies
            client = mlflow.MlflowClient()
            for tag in (ERROR_TAG, FAILURE_TAG):
                if tag in run.data.tags:
                    retry(client.delete_tag, run.info.run_id, tag)
        yield run


def find_parent(experiment: str, recipe_key: str) -> Any | None:
    """The latest parent run of ``experiment`` made from the same resolved recipe, or ``None`` (rank 0's answer
    on every rank of a ``torchrun`` launch)."""
    return distributed.broadcast_object(_find_parent(experiment, recipe_key) if distributed.is_main() else None)


def _find_parent(experiment: str, recipe_key: str) -> Any | None:
    exp = retry(mlflow.get_experiment_by_name, experiment)
    if exp is None:
        return None
    runs = retry(
        mlflow.MlflowClient().search_runs,
        [exp.experiment_id],
        filter_string=f"tags.`{KIND_TAG}` = '{PARENT_KIND}' and tags.`{RECIPE_KEY_TAG}` = '{recipe_key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def cell_runs(parent: Any) -> dict[str, Any]:
    """The child runs of ``parent`` by cell key (a FINISHED one wins over other attempts, then the latest);
    rank 0's answer on every rank of a ``torchrun`` launch."""
    return distributed.broadcast_object(_cell_runs(parent) if distributed.is_main() else None)


def _cell_runs(parent: Any) -> dict[str, Any]:
    client = mlflow.MlflowClient()
    found: list[Any] = []
    token = None
    while True:
        page = retry(
            client.search_runs,
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        found.extend(page)
        token = page.token
        if not token:
            break
    by_key: dict[str, Any] = {}
    for run in found:
        key = run.data.tags.get(CELL_KEY_TAG)
        if key and (key not in by_key or by_key[key].info.status != "FINISHED"):
            by_key[key] = run
    return by_key


def _param(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def log_epoch(metrics: Mapping[str, float | None], step: int) -> None:
    if not distributed.is_main():
        return
    retry(mlflow.log_metrics, {k: float(v) for k, v in metrics.items() if v is not None and v == v}, step=step)


def log_final(metrics: Mapping[str, float | None], step: int = 0) -> None:
    """Final metrics of a cell; ``step`` is its last epoch (keeps per-epoch histories in order)."""
    if not distributed.is_main():
        return
    retry(mlflow.log_metrics, {k: float(v) for k, v in metrics.items() if v is not None}, step=max(step, 0))


def set_tags(tags: Mapping[str, str]) -> None:
    if not distributed.is_main():
        return
    retry(mlflow.set_tags, dict(tags))


def log_text(text: str, artifact_file: str) -> None:
    if not distributed.is_main():
        return
    retry(mlflow.log_text, text, artifact_file)


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    if not distributed.is_main():
        return
    retry(mlflow.log_artifact, str(path), artifact_path)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """A list of flat dicts as CSV text (the per-layer table artifact)."""
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
