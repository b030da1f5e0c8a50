"""``prunebench tune``: an Optuna search of each method's parameters (its regularization factor) on the
validation split, the same way for every method.

One study per tunable method entry of the recipe. A trial samples the entry's searched parameters, runs
sparsity training -> prune to the MACs target -> fine-tune from the cached dense model of one seed with
the short schedule of the ``tune:`` section, and scores the pruned model by its **validation** top-1
(the test split is never read; a guard checks that). Validation top-1 is reported after every epoch so
the pruner can stop a poor trial early; a trial whose loss turns NaN/inf is marked PRUNED with the reason
in its user attribute ``failure`` (pruned rather than failed: Optuna's samplers learn from pruned trials
and ignore failed ones, so the search moves away from a diverging region); any other error marks the
trial FAILED with the reason, and the study goes on.

Studies live in an Optuna RDB storage -- by default ``optuna.db`` beside the MLflow SQLite store, any
URL Optuna accepts otherwise (``postgresql://...``). ``--trials N`` is the **total** a study should
reach: running the same command again resumes the study and tops it up to N (finished trials are kept,
never repeated, an interrupted one is replaced; raise N to add trials), and several processes or
machines on one storage share the N trials between them (each checks the count before it starts a
trial; when they reach N at the same instant the study can end up one trial over per extra process).

MLflow (experiment: the recipe's): one run per study and invocation (tag ``prunebench.kind=study``)
with one nested run per trial (``prunebench.kind=trial``: the method parameters, per-epoch metrics and
the objective). The study run gets the best parameters, Optuna's plots and the *tuned recipe*: the input
recipe (after ``extends`` and overrides) with each tuned parameter set to its best value, which
``prunebench run`` accepts unchanged; it is also written to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from prunebench.errors import UserError
from prunebench.recipe import (
    Recipe,
    SearchSpace,
    TuneConfig,
    is_search_space,
    load_recipe,
    method_label,
    parse_search_space,
    recipe_data,
    resolve_plugin_path,
)



def trial_kind(trial: Any) -> str:
    """COMPLETE, PRUNED, FAIL (an error, with the reason in ``failure``), RUNNING, WAITING, or INTERRUPTED:
    a FAIL without a reason -- stopped by Ctrl-C/SIGTERM, or its process died (the heartbeat check)."""
    name = trial.state.name
    return "INTERRUPTED" if name == "FAIL" and "failure" not in trial.user_attrs else name


def counted_trials(study: Any) -> int:
    """The trials that count toward ``--trials``: all but the interrupted ones, which the next run replaces."""
    return sum(trial_kind(t) != "INTERRUPTED" for t in study.get_trials(deepcopy=False))


# --------------------------------------------------------------------------------------------------
# what to tune


@dataclass
class TuneTask:
    """One study: a ``methods`` entry of the recipe, its fixed parameters and its searched ones."""

    index: int
    name: str
    fixed: dict[str, Any]
    spaces: dict[str, SearchSpace]
    study: str
    derived: tuple[str, ...] = ()  # parameters whose space comes from the schedule (:meth:`Tuner.derive_spaces`)

    @property
    def label(self) -> str:
        return method_label({"name": self.name, **self.fixed})

    def spec(self, values: dict[str, Any]) -> dict[str, Any]:
        """The method entry of a trial: fixed parameters plus the sampled ``values``."""
        return {"name": self.name, **self.fixed, **values}


def default_spaces(name: str) -> dict[str, SearchSpace]:
    """A provisional log-uniform ``lambda`` range around the method's default, when it has one (else nothing);
    :meth:`Tuner.derive_spaces` replaces it by the range the trials' schedule calls for."""
    from prunebench.registry import get_method

    spaces = {}
    for key, f in get_method(name).Params.model_fields.items():
        pname = f.alias or key
        if pname == "lambda" and isinstance(f.default, (int, float)) and f.default > 0:
            d = float(f.default)
            spaces[pname] = SearchSpace(low=d / 10, high=d * 10, log=True)
    return spaces


def plan_tasks(recipe: Recipe, cfg: TuneConfig, methods: list[str] | None, study: str | None,
               say: Callable[[str], None] = print) -> list[TuneTask]:
    """The studies of an invocation: every methods entry with a searched parameter (optionally filtered).

    A parameter is searched when the entry writes it as a space, when ``tune.spaces.<method>`` names it
    (that space wins over a value in the entry), or -- for ``lambda`` -- by default. Entries without any
    are skipped with a message.
    """
    from prunebench.registry import build_method, get_method

    src = str(getattr(recipe, "_source", "recipe"))
    for name in cfg.spaces:
        try:
            get_method(name)
        except UserError as exc:
            raise UserError(f"{src}: tune.spaces.{name}: {exc}") from None
        if name not in {m["name"] for m in recipe.methods}:
            say(f"note: tune.spaces.{name} is ignored: {name!r} is not in the recipe's methods")
    names = [m["name"] for m in recipe.methods]
    if methods:
        unknown = [m for m in methods if m not in names]
        if unknown:
            raise UserError(f"--methods: {', '.join(unknown)} not in the recipe's methods ({', '.join(names)}); "
                            "pick from those")
    tasks: list[TuneTask] = []
    for i, entry in enumerate(recipe.methods):
        name = entry["name"]
        if methods and name not in methods:
            continue
        fixed = {k: v for k, v in entry.items() if k != "name" and not is_search_space(v)}
        spaces = {**default_spaces(name), **{k: parse_search_space(v) for k, v in entry.items() if is_search_space(v)},
                  **cfg.spaces.get(name, {})}
        for key in spaces:
            fixed.pop(key, None)
        if not spaces:
            say(f"{method_label(entry)}: nothing to tune (no search space and no lambda); skipped")
            continue
        explicit = {k for k, v in entry.items() if is_search_space(v)} | set(cfg.spaces.get(name, {}))
        derived = tuple(k for k in default_spaces(name) if k not in explicit)
        base = {"name": name, **fixed, **{k: s.ends[0] for k, s in spaces.items()}}
        for key, space in spaces.items():  # every end of every range must be a valid parameter value
            for value in space.ends:
                build_method({**base, key: value}, where=f"{src}: tune.spaces.{name}")
        tasks.append(TuneTask(i, name, fixed, spaces, "", derived))
    if not tasks:
        raise UserError(f"{src}: nothing to tune: no method in {', '.join(methods or names)} has a search space or a "
                        "lambda; add tune.spaces.<method>.<param>: {low: ..., high: ..., log: true}")
    if any(t.derived for t in tasks) and trial_recipe(recipe, cfg).sparsity.epochs == 0:
        raise UserError(f"{src}: the trials' sparsity stage has no epochs (sparsity.epochs or tune.sparsity_epochs "
                        "is 0), so no lambda can act; give the stage epochs or write the lambda spaces yourself")
    _name_studies(tasks, study or cfg.study, recipe.name, unique=len({t.name for t in tasks}) == len(tasks))
    return tasks


def _name_studies(tasks: list[TuneTask], base: str | None, recipe_name: str, unique: bool) -> None:
    """``<recipe>-<method>`` (the fixed parameters too when a method is listed twice); ``--study`` replaces
    the whole name for a single study and the prefix for several."""
    seen: set[str] = set()
    for t in tasks:
        suffix = t.name if unique else t.label
        name = base if base and len(tasks) == 1 else f"{base or recipe_name}-{suffix}"
        while name in seen:
            name += f"-{t.index}"
        seen.add(name)
        t.study = name


def trial_recipe(recipe: Recipe, cfg: TuneConfig) -> Recipe:
    """The recipe a trial runs: the short schedule of ``tune:`` at one MACs target.

    The data, model and dense sections are untouched, so trials reuse the dense checkpoint that
    ``prunebench run`` caches for the same seed.
    """
    update: dict[str, Any] = {"prune": recipe.prune.model_copy(update={"target": trial_target(recipe, cfg)})}
    if cfg.sparsity_epochs is not None:
        update["sparsity"] = recipe.sparsity.model_copy(update={"epochs": cfg.sparsity_epochs})
    if cfg.finetune_epochs is not None:
        update["finetune"] = recipe.finetune.model_copy(update={"epochs": cfg.finetune_epochs})
    return recipe.model_copy(update=update)


def trial_target(recipe: Recipe, cfg: TuneConfig) -> float:
    return cfg.target if cfg.target is not None else recipe.prune.targets[0]


def trial_seed(recipe: Recipe, cfg: TuneConfig) -> int:
    return cfg.seed if cfg.seed is not None else recipe.seed_list[0]


# --------------------------------------------------------------------------------------------------
# Optuna: storage, sampler, pruner


def default_storage(tracking_uri: str) -> str:
    """``optuna.db`` in the folder of the MLflow SQLite store, else in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return "sqlite:///" + str(db.parent / "optuna.db")
    return "sqlite:///optuna.db"


def mask_url(url: str) -> str:
    """The URL with its password hidden (for logs and MLflow params)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: nothing to hide
        return url


@contextmanager
def sqlite_lock(url: str) -> Iterator[None]:
    """Serialize creating a SQLite database between processes (two fresh schema migrations collide).

    The lock file lives in the temporary folder, named by a hash of the database's absolute path, so
    nothing is left beside the database (SQLite is shared by processes of one machine only).
    """
    if not url.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(url.removeprefix("sqlite:///")).resolve()
    key = hashlib.sha1(str(db).encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"prunebench-sqlite-{key}.lock"), timeout=300):
        yield


def open_storage(url: str, heartbeat_interval: int | None) -> Any:
    """An Optuna ``RDBStorage``; SQLite waits up to 60 s for a lock instead of failing at once."""
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"storage {url!r}: folder {str(folder)!r} does not exist or is not writable; "
                            "fix tune.storage or --storage")
    try:
        with sqlite_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval)
    except Exception as exc:  # bad scheme, missing driver, unreachable server, locked file...
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"storage {mask_url(url)!r} cannot be used ({msg}); fix tune.storage / --storage (any "
                        "SQLAlchemy URL Optuna accepts; PostgreSQL needs `pip install psycopg2-binary`)") from None


class TrialSeededSampler:
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


@functools.cache
def _seeded_sampler_class() -> type:
    """:class:`TrialSeededSampler` as an Optuna ``BaseSampler`` (made lazily: the CLI imports this module
    for every command, and importing optuna costs a second)."""
    import optuna

    return type("TrialSeededSampler", (TrialSeededSampler, optuna.samplers.BaseSampler), {})


def make_sampler(cfg: TuneConfig) -> Any:
    """TPE (default; random trials first, then a model of the results) or random search, seeded per trial."""
    import optuna

    cls = _seeded_sampler_class()
    if cfg.sampler == "random":
        return cls(lambda s: optuna.samplers.RandomSampler(seed=s), cfg.sampler_seed)
    startup = cfg.startup_trials if cfg.startup_trials is not None else min(10, max(1, cfg.trials // 3))
    # constant_liar: a worker treats the others' running trials as poor, so workers spread out
    return cls(lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=startup, constant_liar=True),
               cfg.sampler_seed)


def make_pruner(cfg: TuneConfig, warmup: int, total_epochs: int) -> Any:
    """Median (default) or Hyperband over epochs; no pruning before ``warmup`` epochs."""
    import optuna

    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "hyperband":
        first = min(warmup + 1, max(total_epochs, 1))
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=max(total_epochs, first))
    return optuna.pruners.MedianPruner(n_warmup_steps=warmup)


def suggest(trial: Any, name: str, space: SearchSpace) -> Any:
    """Sample one parameter from its space."""
    if space.choices is not None:
        return trial.suggest_categorical(name, space.choices)
    if space.is_int:
        return trial.suggest_int(name, int(space.low), int(space.high), step=int(space.step or 1), log=space.log)
    return trial.suggest_float(name, float(space.low), float(space.high), step=space.step, log=space.log)


def describe_space(space: SearchSpace) -> str:
    if space.choices is not None:
        return f"choice{space.choices}"
    kind = "loguniform" if space.log else ("int" if space.is_int else "uniform")
    return f"{kind}[{space.low:g}, {space.high:g}]" + (f" step {space.step:g}" if space.step else "")


# --------------------------------------------------------------------------------------------------
# running a study


class _TrialFailed(RuntimeError):
    """A trial raised something other than divergence; it is marked FAILED and the study goes on."""


def end_run(run_id: str, status: str) -> None:
    """End the active MLflow run with ``status``. ``mlflow.end_run`` pops the run before it writes the
    status, so a busy SQLite store is retried on that run id, never by ending the next (parent) run."""
    import mlflow

    from prunebench.tracking import store

    try:
        mlflow.end_run(status)
    except Exception:
        store.retry(mlflow.MlflowClient().set_terminated, run_id, status)


@dataclass
class StudyResult:
    """What one study looks like after an invocation (for the closing table and the tuned recipe)."""

    task: TuneTask
    counts: dict[str, int]
    diverged: int
    best_params: dict[str, Any] | None
    best_value: float | None
    best_number: int | None
    run_id: str | None = None
    best_zero_frac: float | None = None  # the best trial's sparsity_zero_frac (regularized methods)

    @property
    def n_trials(self) -> int:
        """The trials that count toward ``--trials`` (interrupted ones do not)."""
        return sum(n for k, n in self.counts.items() if k != "INTERRUPTED")


def _fmt_params(params: dict[str, Any] | None) -> str:
    if not params:
        return "-"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


class Tuner:
    """Runs the studies of one invocation on one data/dense setup (shared by every study)."""

    def __init__(self, recipe: Recipe, cfg: TuneConfig, storage: Any, storage_url: str, *, quiet: bool) -> None:
        from prunebench.measure import count_macs
        from prunebench.commands.run import Context, dense_model, preflight

        self.recipe, self.cfg, self.storage, self.storage_url = recipe, cfg, storage, storage_url
        self.trecipe = trial_recipe(recipe, cfg)
        self.seed, self.target = trial_seed(recipe, cfg), trial_target(recipe, cfg)
        self.ctx = Context(self.trecipe, quiet)
        preflight(self.ctx)
        if self.ctx.data.split_sizes().get("val", 0) == 0:
            raise UserError(f"{getattr(recipe, '_source', 'recipe')}: data.val_split is 0: tuning scores trials on the "
                            "validation split and never on test; set data.val_split (e.g. 0.1)")
        self.dense = dense_model(self.ctx, self.seed)
        self.macs_dense = count_macs(self.dense, self.ctx.example).macs
        r = self.trecipe
        self.total_epochs = r.sparsity.epochs + (r.prune.iterations - 1) * r.prune.epochs_between + r.finetune.epochs
        self.warmup = cfg.pruner_warmup_epochs if cfg.pruner_warmup_epochs is not None else r.sparsity.epochs
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def derive_spaces(self, tasks: list[TuneTask]) -> None:
        """Replace each derived ``lambda`` space by the range where the trials' sparsity stage reaches
        ``tune.pull_range`` (default: ``sparsity_pull`` 0.5 to 16) on the dense model the trials start from:
        from where the regularizer starts to act up to well past zeroing the median group. A range reaching
        down to inert values would let the tuner pick a lambda that ranks like lambda = 0."""
        from prunebench.groups import build_groups
        from prunebench.registry import build_method
        from prunebench.sparsity import lambda_for_pull

        todo = [t for t in tasks if "lambda" in t.derived]
        if not todo:
            return
        r = self.trecipe
        _, groups = build_groups(self.dense, self.ctx.example, scope=r.prune.scope,
                                 ignored_layers=r.prune.ignored_layers)
        steps = self.ctx.steps_per_epoch
        for t in todo:
            if set(t.spaces) - {"lambda"}:  # e.g. a searched mode changes the pull per lambda: no one range fits
                print(f"{t.label}: lambda keeps the range {describe_space(t.spaces['lambda'])} (other parameters are "
                      "searched too); give it a space to choose another", flush=True)
                continue
            unit = build_method({**t.spec({}), "lambda": 1.0})
            unit.attach(self.dense, groups)
            if not unit.regularized_norms():  # a plugin without the diagnostics: nothing to derive from
                continue
            ends = [lambda_for_pull(unit, r.sparsity, steps, p) for p in self.cfg.pull_range]
            if ends[0] is None or ends[1] is None:
                raise UserError(f"{t.label}: the trials' sparsity stage has no steps (tune.sparsity_epochs or "
                                "sparsity.epochs is 0), so lambda cannot act; give the stage epochs")
            space = SearchSpace(low=float(f"{ends[0]:.3g}"), high=float(f"{ends[1]:.3g}"), log=True)
            for value in space.ends:  # the method's own bounds on lambda still apply
                build_method(t.spec({"lambda": value}), where=f"tune: the lambda range derived for {t.label}")
            t.spaces["lambda"] = space

    # -- one study ----------------------------------------------------------------------------------
    def load_study(self, task: TuneTask) -> Any:
        import optuna

        try:
            with sqlite_lock(self.storage_url):
                study = optuna.create_study(storage=self.storage, study_name=task.study, direction="maximize",
                                            sampler=make_sampler(self.cfg),
                                            pruner=make_pruner(self.cfg, self.warmup, self.total_epochs),
                                            load_if_exists=True)
        except ValueError as exc:  # e.g. an existing study with another direction
            where = f"study {task.study!r} in {mask_url(self.storage_url)}"
            raise UserError(f"{where}: {exc}; pick another --study") from None
        study.set_user_attr("objective", f"{self.cfg.objective} at {100 * self.target:g}% fewer MACs")
        return study

    def run_study(self, task: TuneTask, total: int, timeout: float | None) -> StudyResult:
        """Top the study up to ``total`` trials inside one MLflow study run."""
        import mlflow
        import optuna

        from prunebench.tracking import runs, schema, store

        study = self.load_study(task)
        result = StudyResult(task, {}, 0, None, None, None)
        have = counted_trials(study)
        if have >= total:  # nothing to do: no empty study run in MLflow
            print(f"{task.label}: study {task.study!r} already has {have} trials (asked for {total}); "
                  "raise --trials to add more", flush=True)
            summarize_study(study, result)
            return result
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = store.retry(mlflow.start_run, run_name=f"{task.study}-{stamp}")
        result.run_id, status = run.info.run_id, "FAILED"
        try:
            runs.set_tags({schema.KIND_TAG: "study", schema.RECIPE_TAG: self.recipe.name,
                               "prunebench.study": task.study, **runs.environment_tags()})
            store.retry(mlflow.log_params, {
                "study": task.study, "storage": mask_url(self.storage_url), "method": task.name,
                "method_label": task.label, "objective": self.cfg.objective, "target": self.target,
                "seed": self.seed, "trials": total, "sampler": self.cfg.sampler, "pruner": self.cfg.pruner,
                "sparsity_epochs": self.trecipe.sparsity.epochs, "finetune_epochs": self.trecipe.finetune.epochs,
                "model": self.recipe.model.name, "dataset": self.recipe.data.name,
                **{f"method.{k}": v for k, v in task.fixed.items()},
                **{f"space.{k}": describe_space(s) for k, s in task.spaces.items()},
            })
            print(f"{task.label}: study {task.study!r} ({have} trials so far, topping up to {total}); "
                  + ", ".join(f"{k} ~ {describe_space(s)}" for k, s in task.spaces.items()), flush=True)
            deadline = time.monotonic() + timeout if timeout else math.inf
            objective = self._objective(task)
            while time.monotonic() < deadline:
                if self.cfg.heartbeat_interval:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        optuna.storages.fail_stale_trials(study)  # trials of a dead process stop counting
                if counted_trials(study) >= total:
                    break
                study.optimize(objective, n_trials=1, catch=(_TrialFailed,))
            summarize_study(study, result)
            self._log_study(study, result)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException as exc:
            runs.record_failure(exc)
            raise
        finally:
            end_run(result.run_id, status)
        return result

    def _objective(self, task: TuneTask) -> Callable[[Any], float]:
        """The Optuna objective of ``task``: one trial in its nested MLflow run; returns validation top-1."""
        import mlflow
        import optuna

        from prunebench.tracking import runs, schema, store
        from prunebench.measure import count_macs
        from prunebench.commands.run import train_and_prune
        from prunebench.errors import DivergedError

        def objective(trial: optuna.Trial) -> float:
            values = {k: suggest(trial, k, s) for k, s in task.spaces.items()}
            spec = task.spec(values)
            trial.set_user_attr("worker", self.worker)
            t0 = time.perf_counter()
            run = store.retry(mlflow.start_run, run_name=f"{task.study}-trial{trial.number}", nested=True)
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            state, status = "FAIL", "FAILED"
            head = f"  {task.label} trial {trial.number}: {_fmt_params(values)}"

            def on_epoch(stage: str, stats: Any, step: int) -> None:
                runs.log_epoch({"train_loss": stats.train_loss, "train_penalty": stats.train_penalty,
                                    "train_top1": stats.train_top1, "val_top1": stats.val_top1, "lr": stats.lr,
                                    **stats.diagnostics}, step=step)
                if "sparsity_zero_frac" in stats.diagnostics:  # shown in the study summary beside the value
                    trial.set_user_attr("sparsity_zero_frac", stats.diagnostics["sparsity_zero_frac"])
                trial.report(stats.val_top1, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"stopped by the {self.cfg.pruner} pruner after epoch {step + 1} "
                                             f"({stage}, val_top1 {stats.val_top1:.4f})")

            try:
                runs.set_tags({schema.KIND_TAG: "trial", schema.RECIPE_TAG: self.recipe.name,
                                   "prunebench.study": task.study, "prunebench.trial_number": str(trial.number)})
                store.retry(mlflow.log_params, {
                    "method": task.name, "method_label": method_label(spec), "seed": self.seed, "target": self.target,
                    "model": self.recipe.model.name, "dataset": self.recipe.data.name, "study": task.study,
                    "trial": trial.number, **{f"method.{k}": v for k, v in spec.items() if k != "name"}})
                model, _ = train_and_prune(self.ctx, self.dense, self.macs_dense, spec, self.seed, self.target,
                                           on_epoch=on_epoch)
                value = self.ctx.val_fn(model)
                macs = count_macs(model, self.ctx.example).macs
                reduction = 1 - macs / self.macs_dense
                trial.set_user_attr("macs_reduction", reduction)
                runs.log_final({"val_top1": value, "objective": value, "macs": macs, "macs_reduction": reduction})
                state, status = "COMPLETE", "FINISHED"
                print(f"{head} -> val_top1 {value:.4f} (MACs -{100 * reduction:.1f}%) "
                      f"[{time.perf_counter() - t0:.0f} s]", flush=True)
                return value
            except optuna.TrialPruned as exc:
                state, status = "PRUNED", "KILLED"
                trial.set_user_attr("pruned", str(exc))
                print(f"{head} -> pruned: {exc}", flush=True)
                raise
            except DivergedError as exc:
                state, status = "PRUNED", "KILLED"
                trial.set_user_attr("failure", f"diverged: {exc}")
                runs.set_tags({schema.FAILURE_TAG: "diverged", schema.ERROR_TAG: str(exc)[:4000]})
                print(f"{head} -> diverged ({exc}); marked pruned", flush=True)
                raise optuna.TrialPruned(f"diverged: {exc}") from exc
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL (no reason: not counted)
                status = "KILLED"
                raise
            except UserError:
                raise
            except Exception as exc:  # isolate the failure: mark this trial, go on with the study
                reason = f"{type(exc).__name__}: {exc}"
                trial.set_user_attr("failure", f"error: {reason}"[:4000])
                runs.record_failure(exc)
                print(f"{head} -> FAILED ({reason})", flush=True)
                raise _TrialFailed(reason) from exc
            finally:
                runs.set_tags({"prunebench.trial_state": state})
                end_run(run.info.run_id, status)

        return objective

    # -- reporting ----------------------------------------------------------------------------------
    def _log_study(self, study: Any, result: StudyResult) -> None:
        import mlflow

        from prunebench.tracking import runs, store

        runs.log_final({"n_trials": result.n_trials, "n_complete": result.counts["COMPLETE"],
                            "n_pruned": result.counts["PRUNED"], "n_failed": result.counts["FAIL"],
                            "n_diverged": result.diverged})
        if result.best_params is not None:
            runs.log_final({"best_val_top1": result.best_value})
            store.retry(mlflow.log_params, {f"best.{k}": v for k, v in result.best_params.items()})
            runs.set_tags({"prunebench.best_params": json.dumps(result.best_params)})
        try:
            runs.log_text(study.trials_dataframe().to_csv(index=False), "trials.csv")
        except Exception as exc:  # pandas missing or an odd study: the plots and params still go in
            print(f"  (no trials.csv: {exc})")
        skipped = log_plots(study)
        if skipped:
            print("  plots skipped: " + "; ".join(f"{name} ({reason})" for name, reason in skipped))


def summarize_study(study: Any, result: StudyResult) -> None:
    """Fill ``result`` with the study's trial counts (all workers, all invocations) and its best trial."""
    trials = study.get_trials(deepcopy=False)
    kinds = [trial_kind(t) for t in trials]
    result.counts = {k: kinds.count(k) for k in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING", "INTERRUPTED")}
    result.diverged = sum(str(t.user_attrs.get("failure", "")).startswith("diverged") for t in trials)
    best = best_trial(study)
    if best is not None:
        result.best_params, result.best_value, result.best_number = dict(best.params), best.value, best.number
        result.best_zero_frac = best.user_attrs.get("sparsity_zero_frac")


def best_trial(study: Any) -> Any | None:
    """The completed trial with the highest objective, or ``None``."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(done, key=lambda t: t.value) if done else None


# artifact name -> (function of optuna.visualization.matplotlib, completed trials it needs)
PLOTS: dict[str, tuple[str, int]] = {
    "optimization_history": ("plot_optimization_history", 1),
    "param_importances": ("plot_param_importances", 2),
    "slice": ("plot_slice", 1),
    "intermediate_values": ("plot_intermediate_values", 1),
}


def log_plots(study: Any) -> list[tuple[str, str]]:
    """Optuna's plots as PNG artifacts under ``plots/`` of the active run; returns the ones skipped and why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    from prunebench.tracking import runs

    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    skipped = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (fn, need) in PLOTS.items():
            if n_complete < need:
                skipped.append((name, f"needs {need} completed trial(s), the study has {n_complete}"))
                continue
            try:
                ax = getattr(ovm, fn)(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                path = Path(tmp) / f"{name}.png"
                fig.savefig(path, dpi=100, bbox_inches="tight")
                plt.close(fig)
                runs.log_file(path, "plots")
            except (ValueError, RuntimeError, ImportError, optuna.exceptions.OptunaError) as exc:
                skipped.append((name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            finally:
                plt.close("all")
    return skipped


# --------------------------------------------------------------------------------------------------
# the tuned recipe


def tuned_recipe_data(data: dict[str, Any], recipe: Recipe, best: dict[int, dict[str, Any]],
                      recipe_dir: Path) -> dict[str, Any]:
    """``data`` (the recipe after extends and overrides) with methods entry ``i`` set to ``best[i]``.

    Search spaces are replaced by values, other keys and the ``tune:`` section are kept, and plugin
    files found beside the original recipe are written as absolute paths, so the file runs from anywhere
    ``prunebench run`` on the original would.
    """
    out = copy.deepcopy(data)
    for i, values in best.items():
        entry = dict(recipe.methods[i])
        out["methods"][i] = {**{k: values.get(k, v) for k, v in entry.items()},
                             **{k: v for k, v in values.items() if k not in entry}}
    plugins = []
    for p in out.get("plugins") or []:
        found = resolve_plugin_path(p, recipe_dir)
        plugins.append(p if found == Path(os.path.expandvars(p)).expanduser() else str(found.resolve()))
    if plugins:
        out["plugins"] = plugins
    return out


def default_out(recipe_path: Path) -> Path:
    stem = recipe_path.name.removesuffix(".yaml").removesuffix(".yml").removesuffix(".tuned")
    return Path(f"{stem}.tuned.yaml")


def write_tuned(path: Path, data: dict[str, Any], source: Path, results: list[StudyResult], target: float) -> str:
    """Write the tuned recipe with a header saying where each value comes from; returns the text."""
    lines = [f"# Tuned by `prunebench tune {source}` on {time.strftime('%Y-%m-%d %H:%M')}:",
             f"# the best validation top-1 at {100 * target:g}% fewer MACs after the short schedule of tune:",
             "# (the test split was not read)"]
    for r in results:
        if r.best_params is not None:
            lines.append(f"#   {r.task.label}: {_fmt_params(r.best_params)} -> val_top1 {r.best_value:.4f} "
                         f"(study {r.task.study!r}, trial {r.best_number} of {r.n_trials})")
        else:
            lines.append(f"#   {r.task.label}: no completed trial in study {r.task.study!r}; left as written")
    lines.append(f"# Next: prunebench run {path}")
    text = "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # concurrent workers each write a whole file
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


def format_summary(results: list[StudyResult]) -> str:
    """The closing table: one line per study."""
    head = (f"{'method':<24} {'trials':>6} {'complete':>8} {'pruned':>6} {'(diverged)':>10} {'failed':>6} "
            f"{'running':>7}  {'best':<20} {'val_top1':>8} {'zeroed':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        c = r.counts
        best = f"{r.best_value:.4f}" if r.best_value is not None else "-"
        zeroed = f"{r.best_zero_frac:.0%}" if r.best_zero_frac is not None else "-"
        lines.append(f"{r.task.label:<24} {r.n_trials:>6} {c['COMPLETE']:>8} {c['PRUNED']:>6} {r.diverged:>10} "
                     f"{c['FAIL']:>6} {c['RUNNING'] + c['WAITING']:>7}  {_fmt_params(r.best_params):<20} {best:>8} "
                     f"{zeroed:>6}")
        if c["INTERRUPTED"]:
            lines.append(f"{'':<24} (+{c['INTERRUPTED']} interrupted, not counted: the next run replaces them)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="tune each method's parameters (lambda) with Optuna on the validation split; writes a tuned recipe",
        description="Run one Optuna study per tunable method of RECIPE: each trial trains, prunes to the recipe's\n"
        "(first) MACs target and fine-tunes with the short schedule of the recipe's tune: section, scored by\n"
        "validation top-1 (never test). Studies are stored in an RDB (default: optuna.db beside the MLflow\n"
        "store); running the command again resumes them. Writes a tuned recipe for `prunebench run`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  prunebench tune recipes/quickstart.yaml --trials 20\n"
        "  prunebench tune recipes/quickstart.yaml --methods oicsr,group_lasso -o tune.finetune_epochs=1\n"
        "  prunebench tune recipe.yaml --storage postgresql://user:pw@host/optuna   # on every machine\n"
        "  prunebench run quickstart.tuned.yaml && prunebench compare --experiment quickstart\n\n"
        "--trials is the total each study should reach: rerun with a larger number to add trials.",
    )
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument("--trials", type=int, default=None, metavar="N",
                   help="total trials per study, topped up on resume (default: tune.trials, 20)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="per method: start no new trial after S seconds (default: tune.timeout, none)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage, e.g. sqlite:///optuna.db or postgresql://user:pw@host/db "
                   "(default: tune.storage, else optuna.db beside the MLflow SQLite store)")
    p.add_argument("--study", default=None, metavar="NAME",
                   help="study name (one method) or prefix (several; default <recipe name>-<method>)")
    p.add_argument("--methods", default=None, metavar="A,B", help="tune only these methods of the recipe")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key as in `prunebench run` (e.g. -o tune.finetune_epochs=2)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="where to write the tuned recipe (default: <recipe stem>.tuned.yaml here)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (for logs and CI)")


def tune_config(recipe: Recipe, args: argparse.Namespace) -> TuneConfig:
    """The recipe's ``tune:`` section (defaults when it has none) with the command-line options applied."""
    cli = {"trials": args.trials, "timeout": args.timeout, "storage": args.storage}
    base = (recipe.tune or TuneConfig()).model_dump()
    try:
        return TuneConfig.model_validate({**base, **{k: v for k, v in cli.items() if v is not None}})
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UserError(f"--{e['loc'][0]} {e.get('input')!r}: {e['msg']}") from None


def collect_best(tasks: list[TuneTask], results: list[StudyResult], storage: Any) -> list[StudyResult]:
    """This invocation's results plus, for the other tunable entries, their studies in the storage (tuned
    earlier, e.g. with another ``--methods``), so the tuned recipe gathers every best value there is."""
    import optuna

    done = {r.task.index: r for r in results}
    for t in tasks:
        if t.index in done:
            continue
        try:
            study = optuna.load_study(study_name=t.study, storage=storage)
        except KeyError:  # never tuned
            continue
        done[t.index] = StudyResult(t, {}, 0, None, None, None)
        summarize_study(study, done[t.index])
    return sorted(done.values(), key=lambda r: r.task.index)


def run(args: argparse.Namespace) -> int:
    """``prunebench tune``: returns 0, 1 when a study ends without any completed trial, 130/143 interrupted."""
    import mlflow
    import optuna

    from prunebench.tracking import store
    from prunebench.signals import Interrupted, handle_signals

    source = Path(args.recipe)
    recipe = load_recipe(source, args.override, allow_spaces=True)
    cfg = tune_config(recipe, args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    tasks = plan_tasks(recipe, cfg, methods, args.study)
    all_tasks = plan_tasks(recipe, cfg, None, args.study, say=lambda _m: None) if methods else tasks

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's outcome is printed below, once
    uri = store.connect(recipe.tracking.uri, recipe.experiment)
    storage_url = cfg.storage or default_storage(uri)
    storage = open_storage(storage_url, cfg.heartbeat_interval)
    target = trial_target(recipe, cfg)
    print(f"tuning {', '.join(t.label for t in tasks)} on {recipe.model.name}/{recipe.data.name}: validation top-1 "
          f"at {100 * target:g}% fewer MACs, dense seed {trial_seed(recipe, cfg)}; storage {mask_url(storage_url)}",
          flush=True)
    try:
        with handle_signals():
            tuner = Tuner(recipe, cfg, storage, storage_url, quiet=args.quiet)
            tuner.derive_spaces(tasks)
            results = [tuner.run_study(t, cfg.trials, cfg.timeout) for t in tasks]
    except Interrupted as exc:
        print(f"\nprunebench: stopped by {exc.signal_name}; finished trials are kept in {mask_url(storage_url)} "
              "and the interrupted one will be run again. Resume with the same command.", file=sys.stderr)
        return exc.exit_code
    if tuner.ctx.data.test_reads:  # the contract of train_and_prune; a regression must not go unnoticed
        raise RuntimeError(f"tuning read the test split {tuner.ctx.data.test_reads} times; this is a bug")

    gathered = collect_best(all_tasks, results, storage)
    best = {r.task.index: r.best_params for r in gathered if r.best_params is not None}
    data = tuned_recipe_data(recipe_data(source, args.override), recipe, best, source.parent)
    out = Path(args.out) if args.out else default_out(source)
    text = write_tuned(out, data, source, gathered, target)
    client = mlflow.MlflowClient()
    for r in results:
        if r.run_id is not None:
            store.retry(client.log_text, r.run_id, text, out.name)

    print("\n" + format_summary(results))
    print(f"\ntuned recipe: {out}")
    still = [f"methods[{i}].{k}" for i, m in enumerate(data["methods"]) for k, v in m.items() if is_search_space(v)]
    if still:
        print(f"warning: {', '.join(still)} still a search space (no completed trial); `prunebench run` refuses "
              "the tuned recipe until those are tuned or given values")
    print(f"next: prunebench run {out}  then  prunebench compare --experiment {recipe.experiment!r}")
    print(f"MLflow: {uri}  experiment {recipe.experiment!r}  (study runs: tag prunebench.kind=study)")
    missing = [r.task.label for r in results if r.best_params is None]
    if missing:
        print(f"\nno completed trial for {', '.join(missing)}: left as written in the tuned recipe", flush=True)
        return 1
    return 0
