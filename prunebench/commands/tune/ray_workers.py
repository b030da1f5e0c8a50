"""``prunebench tune --executor ray --workers N``: N Optuna workers per study, as Ray tasks on one storage.

The driver (this process) refuses bad input, connects and prepares as ``--executor local`` does: it trains (or
loads) the dense model of the tuning seed into the workdir's cache and derives the search spaces. Then each
study gets N tasks; each loads the cached dense model and tops the study up to ``--trials`` with
:func:`~prunebench.commands.tune.study.run_study`. Optuna's own distributed mode coordinates them through the
storage (each worker checks the count before it starts a trial), and each worker has its own MLflow study
run, as N ``prunebench tune`` processes on one ``--storage`` would. The storage must be reachable from every
worker: the SQLite file on one machine, a server (``postgresql://``) across machines.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna

from prunebench.commands import raytasks
from prunebench.commands.tune.objective import TrialSetup, prepare
from prunebench.commands.tune.report import StudyResult, counted_trials, summarize_study
from prunebench.commands.tune.study import open_storage, run_study
from prunebench.commands.tune.tasks import TuneTask
from prunebench.errors import one_line
from prunebench.recipe import Recipe, TuneConfig

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 15  # how often the driver says how far the studies are


def run_studies(
    setup: TrialSetup,
    tasks: list[TuneTask],
    storage: Any,
    storage_url: str,
    *,
    uri: str,
    experiment_id: str,
    workers: int,
    address: str | None,
) -> tuple[list[StudyResult], list[str]]:
    """Run ``workers`` Ray tasks per study of ``tasks``; returns each study's result (read from the storage
    once every worker is done) and the MLflow study runs the workers opened."""
    import ray

    cfg = setup.cfg
    options = raytasks.resources(setup.recipe, setup.ctx.device)
    env = raytasks.task_env(setup.recipe, options, uri, experiment_id)
    with raytasks.session(address):
        log.info("ray: %d worker(s) for each of %d studies, each task with %s", workers, len(tasks), options)
        remote = ray.remote(_worker).options(**options, max_retries=0)
        refs = [remote.remote(env, setup.recipe, cfg, t, storage_url) for t in tasks for _ in range(workers)]
        done = _wait(refs, tasks, storage, cfg.trials)
    run_ids = [r.run_id for r in done if r.run_id is not None]
    results = [summarize_study(optuna.load_study(study_name=t.study, storage=storage), t) for t in tasks]
    return results, run_ids


def _wait(refs: list[Any], tasks: list[TuneTask], storage: Any, total: int) -> list[StudyResult]:
    """The workers' results once all are done, saying every :data:`PROGRESS_EVERY_S` s how far each study is.
    A worker's error stops the others and is raised as it would be without Ray; a worker whose process died
    is reported and the others go on; Ctrl-C cancels the workers (their running trials end INTERRUPTED and
    are run again by the same command)."""
    import ray

    waiting, said, out = list(refs), {}, {}
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=PROGRESS_EVERY_S)
            out.update((ref, _result(ref)) for ref in ready)
            for t in tasks:
                n = counted_trials(optuna.load_study(study_name=t.study, storage=storage))
                if said.get(t.study) != n:
                    log.info("  %s: %d/%d trials", t.label, n, total)
                    said[t.study] = n
    except BaseException:
        raytasks.cancel(waiting)
        raise
    return [r for r in (out[ref] for ref in refs) if r is not None]


def _result(ref: Any) -> StudyResult | None:
    """A finished worker's result; ``None`` when its process died (the others go on without it)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise raytasks.first_cause(exc) from None
    except ray.exceptions.RayError as exc:
        log.warning("a tune worker was lost (%s); the other workers go on", one_line(exc, 200))
        return None


def _worker(env: raytasks.TaskEnv, recipe: Recipe, cfg: TuneConfig, task: TuneTask, storage_url: str) -> StudyResult:
    """A Ray task: one Optuna worker of ``task``'s study, from the cached dense model."""
    with raytasks.in_task(env):
        setup = prepare(recipe, cfg, quiet=True)
        result = run_study(
            setup, open_storage(storage_url, cfg.heartbeat_interval), storage_url, task, cfg.trials, cfg.timeout
        )
        if setup.test_reads:  # the contract of train_and_prune, as in the driver
            raise RuntimeError(f"tuning read the test split {setup.test_reads} times; this is a bug")
        return result
