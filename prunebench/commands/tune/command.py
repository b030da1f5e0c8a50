"""``prunebench tune`` from start to end: plan the studies, connect to MLflow and the Optuna storage, prepare
the dense model, run every study, then write the tuned recipe (into each study run too). The steps live in
the modules beside this one; docs/architecture.md shows where tune sits, docs/tracking.md its runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna

from prunebench.commands import raytasks
from prunebench.commands.tune import ray_workers
from prunebench.commands.tune.objective import prepare
from prunebench.commands.tune.report import StudyResult
from prunebench.commands.tune.study import collect_best, default_storage, mask_url, open_storage, run_study
from prunebench.commands.tune.tasks import derive_spaces, plan_tasks, trial_seed, trial_target
from prunebench.commands.tune.tuned_recipe import default_out, still_searched, tuned_recipe_data, write_tuned
from prunebench.recipe import Recipe, TuneConfig, recipe_data
from prunebench.signals import Interrupted, handle_signals
from prunebench.tracking import schema, store

log = logging.getLogger(__name__)


@dataclass
class TuneOutcome:
    """What an invocation did: this invocation's studies, where the tuned recipe went, what it still lacks."""

    results: list[StudyResult]
    out: Path
    missing: list[str]  # labels of the studies without a completed trial (left as written)

    @property
    def exit_code(self) -> int:
        """0, or 1 when a study ends without any completed trial."""
        return 1 if self.missing else 0


def tune_recipe(
    recipe: Recipe,
    cfg: TuneConfig,
    *,
    source: Path,
    overrides: Sequence[str] = (),
    methods: list[str] | None = None,
    study: str | None = None,
    out: Path | None = None,
    quiet: bool = False,
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
) -> TuneOutcome:
    """Run (or resume) one study per tunable method of ``recipe`` (loaded from ``source`` with ``overrides``)
    and write the tuned recipe to ``out`` (default ``<recipe stem>.tuned.yaml``).

    ``executor="ray"`` runs ``workers`` Optuna workers per study as Ray tasks (joining the cluster at
    ``address``, else on a local instance); ``"local"`` runs the studies one after another in this process.
    Raises :class:`~prunebench.errors.UserError` for bad input or an unusable store (before any training),
    :class:`~prunebench.signals.Interrupted` on SIGINT/SIGTERM (finished trials are kept).
    """
    if executor == "ray":
        raytasks.check(address)
    tasks = plan_tasks(recipe, cfg, methods, study)
    all_tasks = plan_tasks(recipe, cfg, None, study, announce=False) if methods else tasks

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's outcome is logged once, by the objective
    uri = store.connect(recipe.tracking.uri, recipe.experiment)
    storage_url = cfg.storage or default_storage(uri)
    storage = open_storage(storage_url, cfg.heartbeat_interval)
    target = trial_target(recipe, cfg)
    log.info(
        "tuning %s on %s/%s: validation top-1 at %g%% fewer MACs, dense seed %d; storage %s",
        ", ".join(t.label for t in tasks),
        recipe.model.name,
        recipe.data.name,
        100 * target,
        trial_seed(recipe, cfg),
        mask_url(storage_url),
    )
    try:
        with handle_signals():
            setup = prepare(recipe, cfg, quiet=quiet)
            derive_spaces(
                tasks,
                setup.dense,
                setup.ctx.example,
                setup.trecipe.sparsity,
                setup.trecipe.prune,
                setup.ctx.steps_per_epoch,
                cfg.pull_range,
            )
            if executor == "ray":
                experiment_id = mlflow.get_experiment_by_name(recipe.experiment).experiment_id
                results, run_ids = ray_workers.run_studies(
                    setup,
                    tasks,
                    storage,
                    storage_url,
                    uri=uri,
                    experiment_id=experiment_id,
                    workers=workers,
                    address=address,
                )
            else:
                results = [run_study(setup, storage, storage_url, t, cfg.trials, cfg.timeout) for t in tasks]
                run_ids = [r.run_id for r in results if r.run_id is not None]
    except Interrupted as exc:
        log.warning(
            "\nprunebench: stopped by %s; finished trials are kept in %s and the interrupted one will be run "
            "again. Resume with the same command.",
            exc.signal_name,
            mask_url(storage_url),
        )
        raise
    if setup.test_reads:  # the contract of train_and_prune; a regression must not go unnoticed
        raise RuntimeError(f"tuning read the test split {setup.test_reads} times; this is a bug")

    gathered = collect_best(all_tasks, results, storage)
    best = {r.task.index: r.best_params for r in gathered if r.best_params is not None}
    data = tuned_recipe_data(recipe_data(source, list(overrides)), recipe, best, source.parent)
    out = out or default_out(source)
    text = write_tuned(out, data, source, gathered, target)
    client = mlflow.MlflowClient()
    for run_id in run_ids:  # every study run of this invocation (one per worker under Ray)
        store.retry(client.log_text, run_id, text, out.name)

    still = still_searched(data)
    if still:
        log.warning(
            "warning: %s still a search space (no completed trial); `prunebench run` refuses the tuned "
            "recipe until those are tuned or given values",
            ", ".join(still),
        )
    log.info("next: prunebench run %s  then  prunebench compare --experiment %r", out, recipe.experiment)
    log.info(
        "MLflow: %s  experiment %r  (study runs: tag %s=%s)", uri, recipe.experiment, schema.KIND_TAG, schema.STUDY_KIND
    )
    missing = [r.task.label for r in results if r.best_params is None]
    if missing:
        log.warning("no completed trial for %s: left as written in the tuned recipe", ", ".join(missing))
    return TuneOutcome(results, out, missing)
