"""``prunebench run --executor ray``: the grid's dense models, then its cells, as Ray tasks.

The driver (this process) makes the checks and the parent run as ``--executor local`` does; then one task per
seed trains that seed's dense model into the workdir's shared cache, and one task per cell runs
:func:`~prunebench.commands.run.cell.run_isolated` in its own MLflow child run under the same parent (each
task points MLflow at the driver's tracking URI: the SQLite file on one machine, a server across machines).
A cell that raises is FAILED by ``run_isolated``; a worker that dies leaves its run RUNNING, and the driver
marks it FAILED once the grid is over. Ctrl-C cancels the tasks (their runs end KILLED). Resources per task:
``executor.resources`` of the recipe (default one GPU on a CUDA machine, else one CPU). What this shares with
``tune --executor ray`` (the checks, the session, a task's set-up) is :mod:`prunebench.commands.raytasks`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.tracking import fluent

from prunebench.commands import raytasks
from prunebench.commands.run.cell import run_isolated
from prunebench.commands.run.context import Context
from prunebench.commands.run.dense import dense_model, dense_start
from prunebench.commands.run.phases import CONTROL, label
from prunebench.commands.run.summary import CellResult
from prunebench.errors import one_line
from prunebench.recipe import Recipe
from prunebench.tracking import schema, store

log = logging.getLogger(__name__)


@dataclass
class PendingCell:
    """A cell (or a seed's dense control, ``spec == CONTROL``) still to run; ``earlier``: its unfinished run.
    What :mod:`.grid` hands to an executor (this module, or its own local loop)."""

    spec: dict[str, Any]
    seed: int
    target: float
    key: str
    earlier: Any | None = None


def run_cells(
    ctx: Context, pending: list[PendingCell], *, parent: Any, uri: str, address: str | None
) -> list[CellResult]:
    """The dense models of the seeds in ``pending`` (one task each), then every cell (one task each), on Ray;
    the results in the order of ``pending``."""
    import ray

    recipe = ctx.recipe
    options = raytasks.resources(recipe, ctx.device)
    env = raytasks.task_env(
        recipe, options, uri, parent.info.experiment_id, parent_id=parent.info.run_id, resume=ctx.resume
    )
    with raytasks.session(address):
        seeds = sorted({c.seed for c in pending})
        log.info("ray: %s dense model(s), then %s cell(s), each task with %s", len(seeds), len(pending), options)
        dense = [ray.remote(_dense_task).options(**options, max_retries=0).remote(env, recipe, s) for s in seeds]
        _get_dense(dense)
        task = ray.remote(_cell_task).options(**options, max_retries=recipe.executor.max_retries)
        return _gather(env, pending, {task.remote(env, recipe, c): i for i, c in enumerate(pending)})


def _get_dense(refs: list[Any]) -> None:
    """Wait for the dense tasks; the error of one that failed is raised as it would be by the local loop."""
    import ray

    try:
        ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        raise raytasks.first_cause(exc) from None
    except KeyboardInterrupt:
        raytasks.cancel(refs, wait_s=0)
        raise


def _gather(env: raytasks.TaskEnv, pending: list[PendingCell], refs: dict[Any, int]) -> list[CellResult]:
    """Collect the cells as they finish; a lost task (its worker died) FAILS its cell; Ctrl-C cancels the rest."""
    import ray

    out: list[CellResult | None] = [None] * len(pending)
    waiting = list(refs)
    lost = False
    try:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                i = refs[ref]
                cell = pending[i]
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    lost = True
                    result = CellResult(label(cell.spec), cell.seed, cell.target, "", control=cell.spec == CONTROL)
                    result.status, result.error = "FAILED", f"{type(exc).__name__}: {one_line(exc, 300)}"
                    log.info("  %s: FAILED (%s)", result.describe(), result.error)
                else:
                    log.info("  %s: %s", result.describe(), result.status)
                out[i] = result
    except KeyboardInterrupt:
        raytasks.cancel(waiting)
        end_orphans(env, "KILLED", "interrupted")
        raise
    if lost:
        for key, run_id in end_orphans(env, "FAILED", "the Ray worker running this cell died").items():
            for i, cell in enumerate(pending):
                if cell.key == key and out[i] is not None and out[i].status != "FINISHED":  # type: ignore[union-attr]
                    out[i].run_id = run_id  # type: ignore[union-attr]
    return [r for r in out if r is not None]


def end_orphans(env: raytasks.TaskEnv, status: str, why: str) -> dict[str, str]:
    """End every child run of the parent still RUNNING (its task is over: the worker died, or was cancelled)
    with ``status``; returns cell key -> run id of those ended."""
    client = store.client(env.uri)
    found = store.retry(
        client.search_runs,
        [env.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{env.parent_id}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    ended: dict[str, str] = {}
    for run in found:
        run_id = run.info.run_id
        if status == "FAILED":
            store.retry(client.set_tag, run_id, schema.ERROR_TAG, f"WorkerDied: {why}")
            store.retry(client.set_tag, run_id, schema.FAILURE_TAG, "error")
        store.retry(client.set_terminated, run_id, status)
        ended[run.data.tags.get(schema.CELL_KEY_TAG, "")] = run_id
    return ended


@contextlib.contextmanager
def _under_parent(parent_id: str) -> Iterator[None]:
    """Make the driver's parent run the active run of this process, without starting or ending it, so that
    the cell's run (``nested=True``) is its child. MLflow has no public call for "a run is active here
    that another process owns": its run stack is pushed and popped directly."""
    stack = fluent._active_run_stack.get()
    stack.append(mlflow.ActiveRun(store.retry(mlflow.MlflowClient().get_run, parent_id)))
    try:
        yield
    finally:
        stack.pop()


def _dense_task(env: raytasks.TaskEnv, recipe: Recipe, seed: int) -> None:
    """A Ray task: the dense model of ``seed`` trained once into the workdir's cache (or found there)."""
    with raytasks.in_task(env):
        dense_model(Context(recipe, True, resume=env.resume), seed)


def _cell_task(env: raytasks.TaskEnv, recipe: Recipe, cell: PendingCell) -> CellResult:
    """A Ray task: one cell in its own MLflow child run of the parent, from its seed's cached dense model."""
    with raytasks.in_task(env):
        ctx = Context(recipe, True, resume=env.resume)
        start = dense_start(ctx, cell.seed)
        with _under_parent(env.parent_id):
            return run_isolated(ctx, start, cell.spec, cell.seed, cell.target, cell.key, cell.earlier)
