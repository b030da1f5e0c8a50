"""One trial of ``prunebench tune``: what every trial starts from (:func:`prepare`, which trains or loads the
dense model -- an explicit step, never a side effect of building something) and the Optuna objective.

A trial samples its task's searched parameters, runs sparsity training -> prune to the MACs target ->
fine-tune from the dense model with the short schedule of ``tune:`` and returns the **validation** top-1
(the test split is never read). Validation top-1 is reported after every epoch so the pruner can stop a
poor trial early. A trial whose loss turns NaN/inf is PRUNED with the reason in its user attribute
``failure`` (Optuna's samplers learn from pruned trials and ignore failed ones, so the search moves away
from a diverging region); any other error marks it FAILED with the reason, and the study goes on.
Each trial is a nested MLflow run (docs/tracking.md).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
import optuna
from torch import nn

from prunebench.commands.run import Context, dense_model, preflight, train_and_prune
from prunebench.commands.tune.tasks import TuneTask, format_params, suggest, trial_recipe, trial_seed, trial_target
from prunebench.errors import DivergedError, UserError
from prunebench.measure import count_macs
from prunebench.recipe import Recipe, TuneConfig, method_label
from prunebench.tracking import runs, schema, store
from prunebench.tracking.runs import tracked_run

log = logging.getLogger(__name__)


class TrialFailed(RuntimeError):
    """A trial raised something other than divergence; it is marked FAILED and the study goes on."""


@dataclass
class TrialSetup:
    """What every trial of an invocation shares: the data, the dense model and the short schedule."""

    recipe: Recipe  # as given (after extends and overrides)
    cfg: TuneConfig
    trecipe: Recipe  # the trials' recipe: tune:'s short schedule at one target, scope resolved (preflight)
    ctx: Context
    dense: nn.Module
    macs_dense: float
    seed: int
    target: float
    total_epochs: int  # epochs of a whole trial (the pruner's resource)
    warmup: int  # epochs before the pruner may stop a trial
    worker: str  # host:pid, recorded on every trial

    @property
    def test_reads(self) -> int:
        """How often the test split was read (must stay 0: tuning scores on validation only)."""
        return self.ctx.data.test_reads


def prepare(recipe: Recipe, cfg: TuneConfig, *, quiet: bool) -> TrialSetup:
    """Load the data and train (or load the cached) dense model of the tuning seed: the one expensive step
    before the first trial. Refuses, before that, a recipe without a validation split and a trial target
    the prunable groups cannot reach (:func:`prunebench.commands.run.preflight`)."""
    ctx = Context(trial_recipe(recipe, cfg), quiet)
    preflight(ctx)  # also refuses a trial target out of reach and resolves scope auto, before any training
    trecipe = ctx.recipe  # with the resolved scope: the trials and derive_spaces use the groups the check saw
    if ctx.data.split_sizes().get("val", 0) == 0:
        raise UserError(
            f"{getattr(recipe, '_source', 'recipe')}: data.val_split is 0: tuning scores trials on the "
            "validation split and never on test; set data.val_split (e.g. 0.1)"
        )
    seed = trial_seed(recipe, cfg)
    dense = dense_model(ctx, seed)
    r = trecipe
    sparsity_epochs = r.sparsity.epochs
    return TrialSetup(
        recipe=recipe,
        cfg=cfg,
        trecipe=trecipe,
        ctx=ctx,
        dense=dense,
        macs_dense=count_macs(dense, ctx.example).macs,
        seed=seed,
        target=trial_target(recipe, cfg),
        total_epochs=sparsity_epochs + (r.prune.iterations - 1) * r.prune.epochs_between + r.finetune.epochs,
        warmup=cfg.pruner_warmup_epochs if cfg.pruner_warmup_epochs is not None else sparsity_epochs,
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )


def _pruned(exc: BaseException) -> bool:
    """A trial run that ends KILLED rather than FAILED: pruned, or diverged (tagged before it is re-raised)."""
    return isinstance(exc, optuna.TrialPruned)


def make_objective(setup: TrialSetup, task: TuneTask) -> Callable[[optuna.Trial], float]:
    """The Optuna objective of ``task``: one trial in its nested MLflow run; returns validation top-1."""
    recipe = setup.recipe

    def objective(trial: optuna.Trial) -> float:
        values = {k: suggest(trial, k, s) for k, s in task.spaces.items()}
        spec = task.spec(values)
        trial.set_user_attr("worker", setup.worker)
        t0 = time.perf_counter()
        head = f"  {task.label} trial {trial.number}: {format_params(values)}"

        def on_epoch(stage: str, stats: Any, step: int) -> None:
            runs.log_epoch(schema.epoch_metrics(stats), step=step)
            if "sparsity_zero_frac" in stats.diagnostics:  # shown in the study summary beside the value
                trial.set_user_attr("sparsity_zero_frac", stats.diagnostics["sparsity_zero_frac"])
            trial.report(stats.val_top1, step)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"stopped by the {setup.cfg.pruner} pruner after epoch {step + 1} "
                    f"({stage}, val_top1 {stats.val_top1:.4f})"
                )

        try:
            with tracked_run(f"{task.study}-trial{trial.number}", nested=True, stopped=_pruned) as run:
                trial.set_user_attr("mlflow_run_id", run.info.run_id)
                state = "FAIL"
                try:
                    runs.set_tags(
                        {
                            schema.KIND_TAG: schema.TRIAL_KIND,
                            schema.RECIPE_TAG: recipe.name,
                            schema.STUDY_TAG: task.study,
                            schema.TRIAL_NUMBER_TAG: str(trial.number),
                        }
                    )
                    store.retry(
                        mlflow.log_params,
                        {
                            **dict(
                                zip(
                                    schema.TRIAL_PARAMS,
                                    (
                                        task.name,
                                        method_label(spec),
                                        setup.seed,
                                        setup.target,
                                        recipe.model.name,
                                        recipe.data.name,
                                        task.study,
                                        trial.number,
                                    ),
                                    strict=True,
                                )
                            ),
                            **{f"{schema.METHOD_PARAM_PREFIX}{k}": v for k, v in spec.items() if k != "name"},
                        },
                    )
                    model, _ = train_and_prune(
                        setup.ctx, setup.dense, setup.macs_dense, spec, setup.seed, setup.target, on_epoch=on_epoch
                    )
                    value = setup.ctx.val_fn(model)
                    macs = count_macs(model, setup.ctx.example).macs
                    reduction = 1 - macs / setup.macs_dense
                    trial.set_user_attr("macs_reduction", reduction)
                    runs.log_final(dict(zip(schema.TRIAL_METRICS, (value, value, macs, reduction), strict=True)))
                    state = "COMPLETE"
                except optuna.TrialPruned as exc:
                    state = "PRUNED"
                    trial.set_user_attr("pruned", str(exc))
                    log.info("%s -> pruned: %s", head, exc)
                    raise
                except DivergedError as exc:
                    state = "PRUNED"
                    trial.set_user_attr("failure", f"diverged: {exc}")
                    runs.set_tags({schema.FAILURE_TAG: "diverged", schema.ERROR_TAG: str(exc)[:4000]})
                    log.info("%s -> diverged (%s); marked pruned", head, exc)
                    raise optuna.TrialPruned(f"diverged: {exc}") from exc
                finally:
                    runs.set_tags({schema.TRIAL_STATE_TAG: state})
        except (optuna.TrialPruned, UserError):  # (an interrupt, too, goes up: Optuna marks the trial FAIL
            raise  # without a reason -- not counted, replaced by the next run)
        except Exception as exc:  # the run ended FAILED with the error recorded; mark this trial, go on
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("failure", f"error: {reason}"[:4000])
            log.warning("%s -> FAILED (%s)", head, reason)
            raise TrialFailed(reason) from exc
        log.info("%s -> val_top1 %.4f (MACs -%.1f%%) [%.0f s]", head, value, 100 * reduction, time.perf_counter() - t0)
        return value

    return objective
