"""``prunebench run --executor ray``: the grid's dense models, then its cells, as Ray tasks.

The driver (this process) makes the checks and the parent run as ``--executor local`` does; then one task per
seed trains that seed's dense model into the workdir's shared cache, and one task per cell runs
:func:`~prunebench.commands.run.cell.run_isolated` in its own MLflow child run under the same parent (each
task points MLflow at the driver's tracking URI: the SQLite file on one machine, a server across machines).
A cell that raises is FAILED by ``run_isolated``; a worker that dies leaves its run RUNNING, and the driver
marks it FAILED once the grid is over. Ctrl-C cancels the tasks (their runs end KILLED). Resources per task:
``executor.resources`` of the recipe (default one GPU on a CUDA machine, else one CPU).
Ray is optional (``pip install 'prunebench[scale]'``) and imported where it is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import fluent

from prunebench.commands.run.cell import run_isolated
from prunebench.commands.run.context import Context
from prunebench.commands.run.dense import dense_model, dense_start
from prunebench.commands.run.phases import CONTROL, label
from prunebench.commands.run.summary import CellResult
from prunebench.errors import UserError, one_line
from prunebench.recipe import Recipe
from prunebench.registry import load_plugin_file, resolve_plugin_path
from prunebench.tracking import schema, store

log = logging.getLogger(__name__)
ADDRESS_TIMEOUT_S = 5
_RAY_OPTIONS = ("num_cpus", "num_gpus", "memory")  # the rest of executor.resources are custom resources


@dataclass
class PendingCell:
    """A cell (or a seed's dense control, ``spec == CONTROL``) still to run; ``earlier``: its unfinished run.
    What :mod:`.grid` hands to an executor (this module, or its own local loop)."""

    spec: dict[str, Any]
    seed: int
    target: float
    key: str
    earlier: Any | None = None


def check(address: str | None) -> None:
    """Refuse ``--executor ray`` without Ray installed, or with an ``address`` whose port does not answer
    (in :data:`ADDRESS_TIMEOUT_S` seconds), with one :class:`UserError` line."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed: {store.SCALE_EXTRA}") from None
    if address is None or address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379, the head's GCS port)")
    try:
        with socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(
            f"--address {address!r}: no Ray cluster answers there ({one_line(exc, 120)}); start one with "
            "`ray start --head` and pass the address it prints, or leave --address out for a local instance"
        ) from None


@dataclass(frozen=True)
class TaskEnv:
    """What a task needs from the driver besides the recipe and its cell."""

    cwd: str  # relative paths of the recipe (workdir, data root, checkpoint) name files from here
    uri: str
    experiment_id: str
    parent_id: str
    resume: bool
    plugins: tuple[str, ...]  # the recipe's plugin files, absolute
    threads: int | None  # torch threads: the task's CPUs


def resources(recipe: Recipe, device: torch.device) -> dict[str, Any]:
    """The Ray options of one task: ``executor.resources``, else a GPU on a CUDA device, else a CPU."""
    wanted = dict(recipe.executor.resources or ({"num_gpus": 1} if device.type == "cuda" else {"num_cpus": 1}))
    options = {k: wanted.pop(k) for k in _RAY_OPTIONS if k in wanted}
    if wanted:
        options["resources"] = wanted
    return options


def run_cells(
    ctx: Context, pending: list[PendingCell], *, parent: Any, uri: str, address: str | None
) -> list[CellResult]:
    """The dense models of the seeds in ``pending`` (one task each), then every cell (one task each), on Ray;
    the results in the order of ``pending``."""
    import ray

    recipe = ctx.recipe
    options = resources(recipe, ctx.device)
    source = Path(str(getattr(recipe, "_source", "recipe.yaml")))
    env = TaskEnv(
        cwd=os.getcwd(),
        uri=uri,
        experiment_id=parent.info.experiment_id,
        parent_id=parent.info.run_id,
        resume=ctx.resume,
        plugins=tuple(str(resolve_plugin_path(p, source.parent).resolve()) for p in recipe.plugins),
        threads=max(1, int(options["num_cpus"])) if "num_cpus" in options else None,
    )
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        seeds = sorted({c.seed for c in pending})
        log.info("ray: %s dense model(s), then %s cell(s), each task with %s", len(seeds), len(pending), options)
        dense = [ray.remote(_dense_task).options(**options, max_retries=0).remote(env, recipe, s) for s in seeds]
        _get_dense(dense)
        task = ray.remote(_cell_task).options(**options, max_retries=recipe.executor.max_retries)
        return _gather(env, pending, {task.remote(env, recipe, c): i for i, c in enumerate(pending)})
    finally:
        if started:
            ray.shutdown()


def _get_dense(refs: list[Any]) -> None:
    """Wait for the dense tasks; the error of one that failed is raised as it would be by the local loop."""
    import ray

    try:
        ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref)
        raise


def _gather(env: TaskEnv, pending: list[PendingCell], refs: dict[Any, int]) -> list[CellResult]:
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
        for ref in waiting:
            ray.cancel(ref)  # a running task gets KeyboardInterrupt: its run ends KILLED
        with contextlib.suppress(Exception):
            ray.wait(waiting, num_returns=len(waiting), timeout=30)
        end_orphans(env, "KILLED", "interrupted")
        raise
    if lost:
        for key, run_id in end_orphans(env, "FAILED", "the Ray worker running this cell died").items():
            for i, cell in enumerate(pending):
                if cell.key == key and out[i] is not None and out[i].status != "FINISHED":  # type: ignore[union-attr]
                    out[i].run_id = run_id  # type: ignore[union-attr]
    return [r for r in out if r is not None]


def end_orphans(env: TaskEnv, status: str, why: str) -> dict[str, str]:
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
def _in_task(env: TaskEnv) -> Iterator[None]:
    """A task's process set up as the driver's: its folder, plugins, tracking URI and experiment, threads."""
    previous = os.getcwd()
    if Path(env.cwd).is_dir():  # on another machine the recipe's paths must be absolute or shared
        os.chdir(env.cwd)
    try:
        for plugin in env.plugins:
            load_plugin_file(plugin)
        if env.threads is not None:
            torch.set_num_threads(env.threads)
        store.quiet_mlflow()
        mlflow.set_tracking_uri(env.uri)
        mlflow.set_experiment(experiment_id=env.experiment_id)
        yield
    finally:
        os.chdir(previous)


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


def _dense_task(env: TaskEnv, recipe: Recipe, seed: int) -> None:
    """A Ray task: the dense model of ``seed`` trained once into the workdir's cache (or found there)."""
    with _in_task(env):
        dense_model(Context(recipe, True, resume=env.resume), seed)


def _cell_task(env: TaskEnv, recipe: Recipe, cell: PendingCell) -> CellResult:
    """A Ray task: one cell in its own MLflow child run of the parent, from its seed's cached dense model."""
    with _in_task(env):
        ctx = Context(recipe, True, resume=env.resume)
        start = dense_start(ctx, cell.seed)
        with _under_parent(env.parent_id):
            return run_isolated(ctx, start, cell.spec, cell.seed, cell.target, cell.key, cell.earlier)
