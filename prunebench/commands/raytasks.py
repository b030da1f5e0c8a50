"""What the commands that run on Ray share (``run --executor ray``, ``tune --executor ray``): the refusal of a
missing Ray or an address that does not answer, the Ray session (a local instance, or joining a cluster),
the options of one task, and setting a task's process up as the driver's (folder, plugins, threads,
tracking URI and experiment). docs/architecture.md ("Scale-out") shows where each command uses it.
Ray is optional (``pip install 'prunebench[scale]'``) and imported where it is used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from prunebench.errors import UserError, one_line
from prunebench.hostmem import keep_freed_memory
from prunebench.recipe import Recipe
from prunebench.registry import load_plugin_file, resolve_plugin_path
from prunebench.signals import SIGNALS, as_interrupted
from prunebench.tracking import store

ADDRESS_TIMEOUT_S = 5
_RAY_OPTIONS = ("num_cpus", "num_gpus", "memory")  # the rest of executor.resources are custom resources


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


def resources(recipe: Recipe, device: torch.device) -> dict[str, Any]:
    """The Ray options of one task: ``executor.resources``, else a GPU on a CUDA device, else a CPU."""
    wanted = dict(recipe.executor.resources or ({"num_gpus": 1} if device.type == "cuda" else {"num_cpus": 1}))
    options = {k: wanted.pop(k) for k in _RAY_OPTIONS if k in wanted}
    if wanted:
        options["resources"] = wanted
    return options


@dataclass(frozen=True)
class TaskEnv:
    """What a task needs from the driver besides its own work."""

    cwd: str  # relative paths of the recipe (workdir, data root, checkpoint) name files from here
    uri: str
    experiment_id: str
    plugins: tuple[str, ...]  # the recipe's plugin files, absolute
    threads: int | None  # torch threads: the task's CPUs
    parent_id: str | None = None  # run: the parent run of the grid's cells
    resume: bool = False  # run: --resume


def task_env(recipe: Recipe, options: dict[str, Any], uri: str, experiment_id: str, **extra: Any) -> TaskEnv:
    """The :class:`TaskEnv` of ``recipe``'s tasks, run with Ray ``options``, logging to ``uri``/``experiment_id``."""
    source = Path(str(getattr(recipe, "_source", "recipe.yaml")))
    return TaskEnv(
        cwd=os.getcwd(),
        uri=uri,
        experiment_id=experiment_id,
        plugins=tuple(str(resolve_plugin_path(p, source.parent).resolve()) for p in recipe.plugins),
        threads=max(1, int(options["num_cpus"])) if "num_cpus" in options else None,
        **extra,
    )


@contextlib.contextmanager
def session(address: str | None) -> Iterator[None]:
    """Ray, initialized here unless it already is: joining ``address``, else a local instance with this
    machine's CPUs; shut down at the end only if it was started here.

    Ctrl-C and SIGTERM stay prunebench's (:mod:`prunebench.signals`): ``ray.init`` replaces the SIGTERM
    handler, which is put back, and Ray raises a plain ``KeyboardInterrupt`` out of its waits on Ctrl-C,
    which leaves the block as :class:`~prunebench.signals.Interrupted` of the signal received (the command then says how to resume)."""
    import ray

    started = not ray.is_initialized()
    if started:
        handlers = {s: signal.getsignal(s) for s in SIGNALS}
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        with contextlib.suppress(ValueError):  # not the main thread: nothing was installed here
            for s, handler in handlers.items():
                if handler is not None:
                    signal.signal(s, handler)
    try:
        yield
    except KeyboardInterrupt as exc:
        raise as_interrupted(exc) from None
    finally:
        if started:
            ray.shutdown()


def cancel(refs: list[Any], wait_s: float = 30) -> None:
    """Cancel the tasks of ``refs`` (a running one gets KeyboardInterrupt, so its runs end KILLED and its trial
    INTERRUPTED) and give them up to ``wait_s`` seconds to finish that bookkeeping."""
    import ray

    for ref in refs:
        ray.cancel(ref)
    if refs and wait_s > 0:
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=wait_s)


def first_cause(exc: BaseException) -> BaseException:
    """The exception a task raised, out of Ray's wrapper (so it reads as it would without Ray)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc


@contextlib.contextmanager
def in_task(env: TaskEnv) -> Iterator[None]:
    """A task's process set up as the driver's: its folder, plugins, tracking URI and experiment, threads."""
    previous = os.getcwd()
    if Path(env.cwd).is_dir():  # on another machine the recipe's paths must be absolute or shared
        os.chdir(env.cwd)
    try:
        keep_freed_memory()  # as the driver's command line did (prunebench.hostmem)
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
