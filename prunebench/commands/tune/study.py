"""Optuna studies of ``prunebench tune``: their storage, sampler and pruner, loading one, and topping it up
to ``--trials`` inside one MLflow study run.

Studies live in an Optuna RDB storage -- by default ``optuna.db`` beside the MLflow SQLite store, any URL
Optuna accepts otherwise (``postgresql://...``). ``--trials N`` is the **total** a study should reach: the
same command again resumes the study and tops it up to N (finished trials are kept, an interrupted one is
replaced), and several processes or machines on one storage share the N trials (each checks the count
before it starts a trial; when they reach N at the same instant the study can end up one trial over per
extra process). The sampler is seeded per trial (:class:`TrialSeededSampler`). docs/tracking.md describes
the study and trial runs.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
from sqlalchemy.engine import make_url

from prunebench.commands.tune.objective import TrialFailed, TrialSetup, make_objective
from prunebench.commands.tune.report import StudyResult, counted_trials, log_study, summarize_study
from prunebench.commands.tune.tasks import TuneTask, describe_space
from prunebench.errors import UserError, one_line
from prunebench.files import sqlite_lock
from prunebench.recipe import TuneConfig
from prunebench.tracking import runs, schema, store
from prunebench.tracking.runs import tracked_run

log = logging.getLogger(__name__)


def default_storage(tracking_uri: str) -> str:
    """``optuna.db`` in the folder of the MLflow SQLite store, else in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return "sqlite:///" + str(db.parent / "optuna.db")
    return "sqlite:///optuna.db"


def mask_url(url: str) -> str:
    """The URL with its password hidden (for logs and MLflow params)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: nothing to hide
        return url


def open_storage(url: str, heartbeat_interval: int | None) -> Any:
    """An Optuna ``RDBStorage``; SQLite waits up to 60 s for a lock instead of failing at once."""
    store.check_driver(url, "storage")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(
                f"storage {url!r}: folder {str(folder)!r} does not exist or is not writable; "
                "fix tune.storage or --storage"
            )
    try:
        with sqlite_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval)
    except Exception as exc:  # bad scheme, missing driver, unreachable server, locked file...
        raise UserError(
            f"storage {mask_url(url)!r} cannot be used ({one_line(exc)}); fix tune.storage / --storage "
            f"(any SQLAlchemy URL Optuna accepts; PostgreSQL needs `{store.SCALE_EXTRA}`)"
        ) from None


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler re-created for every trial with a seed mixed from ``seed`` and the trial number.

    Why: one seeded sampler replays the same random draws in every process, so two workers on one study
    (or a resumed study) would try the same parameters again. Trial numbers are unique within a study,
    so seeding by them keeps a single-process study reproducible while parallel and resumed workers
    draw different values. TPE and random sampling keep no other state between trials (TPE reads the
    finished trials from the storage each time).
    """

    def __init__(self, make: Callable[[int], Any], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study: Any, trial: Any) -> None:
        self._inner = self._make(self._seed * 1_000_003 + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(cfg: TuneConfig) -> TrialSeededSampler:
    """TPE (default; random trials first, then a model of the results) or random search, seeded per trial."""
    if cfg.sampler == "random":
        return TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), cfg.sampler_seed)
    startup = cfg.startup_trials if cfg.startup_trials is not None else min(10, max(1, cfg.trials // 3))
    # constant_liar: a worker treats the others' running trials as poor, so workers spread out
    return TrialSeededSampler(
        lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=startup, constant_liar=True), cfg.sampler_seed
    )


def make_pruner(cfg: TuneConfig, warmup: int, total_epochs: int) -> Any:
    """Median (default) or Hyperband over epochs; no pruning before ``warmup`` epochs."""
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "hyperband":
        first = min(warmup + 1, max(total_epochs, 1))
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=max(total_epochs, first))
    return optuna.pruners.MedianPruner(n_warmup_steps=warmup)


def load_study(setup: TrialSetup, storage: Any, storage_url: str, task: TuneTask) -> optuna.Study:
    """The task's study in ``storage``, created on first use."""
    cfg = setup.cfg
    try:
        with sqlite_lock(storage_url):
            study = optuna.create_study(
                storage=storage,
                study_name=task.study,
                direction="maximize",
                sampler=make_sampler(cfg),
                pruner=make_pruner(cfg, setup.warmup, setup.total_epochs),
                load_if_exists=True,
            )
    except ValueError as exc:  # e.g. an existing study with another direction
        raise UserError(f"study {task.study!r} in {mask_url(storage_url)}: {exc}; pick another --study") from None
    study.set_user_attr("objective", f"{cfg.objective} at {100 * setup.target:g}% fewer MACs")
    return study


def run_study(
    setup: TrialSetup, storage: Any, storage_url: str, task: TuneTask, total: int, timeout: float | None
) -> StudyResult:
    """Top the study up to ``total`` trials (starting none after ``timeout`` seconds) in one MLflow study run."""
    study = load_study(setup, storage, storage_url, task)
    have = counted_trials(study)
    if have >= total:  # nothing to do: no empty study run in MLflow
        log.info(
            "%s: study %r already has %d trials (asked for %d); raise --trials to add more",
            task.label,
            task.study,
            have,
            total,
        )
        return summarize_study(study, task)
    recipe, trecipe, cfg = setup.recipe, setup.trecipe, setup.cfg
    with tracked_run(f"{task.study}-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        runs.set_tags(
            {
                schema.KIND_TAG: schema.STUDY_KIND,
                schema.RECIPE_TAG: recipe.name,
                schema.STUDY_TAG: task.study,
                **runs.environment_tags(),
            }
        )
        values = (
            task.study,
            mask_url(storage_url),
            task.name,
            task.label,
            cfg.objective,
            setup.target,
            setup.seed,
            total,
            cfg.sampler,
            cfg.pruner,
            trecipe.sparsity.epochs,
            trecipe.finetune.epochs,
            recipe.model.name,
            recipe.data.name,
        )
        store.retry(
            mlflow.log_params,
            {
                **dict(zip(schema.STUDY_PARAMS, values, strict=True)),
                **{f"{schema.METHOD_PARAM_PREFIX}{k}": v for k, v in task.fixed.items()},
                **{f"{schema.SPACE_PARAM_PREFIX}{k}": describe_space(s) for k, s in task.spaces.items()},
            },
        )
        log.info(
            "%s: study %r (%d trials so far, topping up to %d); %s",
            task.label,
            task.study,
            have,
            total,
            ", ".join(f"{k} ~ {describe_space(s)}" for k, s in task.spaces.items()),
        )
        deadline = time.monotonic() + timeout if timeout else math.inf
        objective = make_objective(setup, task)
        while time.monotonic() < deadline:
            if cfg.heartbeat_interval:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)  # trials of a dead process stop counting
            if counted_trials(study) >= total:
                break
            study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        result = summarize_study(study, task, run.info.run_id)
        log_study(study, result)
    return result


def collect_best(tasks: list[TuneTask], results: list[StudyResult], storage: Any) -> list[StudyResult]:
    """This invocation's results plus, for the other tunable entries, their studies in the storage (tuned
    earlier, e.g. with another ``--methods``), so the tuned recipe gathers every best value there is."""
    done = {r.task.index: r for r in results}
    for t in tasks:
        if t.index in done:
            continue
        try:
            study = optuna.load_study(study_name=t.study, storage=storage)
        except KeyError:  # never tuned
            continue
        done[t.index] = summarize_study(study, t)
    return sorted(done.values(), key=lambda r: r.task.index)
