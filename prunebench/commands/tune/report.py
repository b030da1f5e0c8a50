"""What a study looks like after an invocation: its trial counts and best trial (:class:`StudyResult`), the
closing table of ``prunebench tune``, and what the study run gets in MLflow (counts, best parameters,
``trials.csv``, Optuna's plots). Names of what is tracked come from :mod:`prunebench.tracking.schema`; the
layout of study and trial runs is in docs/tracking.md.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import mlflow
import optuna
import optuna.visualization.matplotlib as ovm
from optuna.trial import TrialState
from tabulate import tabulate

from prunebench.commands.tune.tasks import TuneTask, format_params
from prunebench.errors import one_line
from prunebench.tracking import runs, schema, store

log = logging.getLogger(__name__)

KINDS = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING", "INTERRUPTED")


def trial_kind(trial: Any) -> str:
    """COMPLETE, PRUNED, FAIL (an error, with the reason in ``failure``), RUNNING, WAITING, or INTERRUPTED:
    a FAIL without a reason -- stopped by Ctrl-C/SIGTERM, or its process died (the heartbeat check)."""
    name = trial.state.name
    return "INTERRUPTED" if name == "FAIL" and "failure" not in trial.user_attrs else name


def counted_trials(study: Any) -> int:
    """The trials that count toward ``--trials``: all but the interrupted ones, which the next run replaces."""
    return sum(trial_kind(t) != "INTERRUPTED" for t in study.get_trials(deepcopy=False))


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


def summarize_study(study: Any, task: TuneTask, run_id: str | None = None) -> StudyResult:
    """The study's trial counts (all workers, all invocations) and its best trial."""
    trials = study.get_trials(deepcopy=False)
    kinds = [trial_kind(t) for t in trials]
    result = StudyResult(
        task,
        {k: kinds.count(k) for k in KINDS},
        sum(str(t.user_attrs.get("failure", "")).startswith("diverged") for t in trials),
        None,
        None,
        None,
        run_id,
    )
    best = best_trial(study)
    if best is not None:
        result.best_params, result.best_value, result.best_number = dict(best.params), best.value, best.number
        result.best_zero_frac = best.user_attrs.get("sparsity_zero_frac")
    return result


def best_trial(study: Any) -> Any | None:
    """The completed trial with the highest objective, or ``None``."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(done, key=lambda t: t.value) if done else None


def format_summary(results: list[StudyResult]) -> str:
    """The closing table: one row per study, then a note per study with interrupted trials."""
    rows = []
    for r in results:
        c = r.counts
        rows.append(
            [
                r.task.label,
                r.n_trials,
                c["COMPLETE"],
                c["PRUNED"],
                r.diverged,
                c["FAIL"],
                c["RUNNING"] + c["WAITING"],
                format_params(r.best_params),
                f"{r.best_value:.4f}" if r.best_value is not None else "-",
                f"{r.best_zero_frac:.0%}" if r.best_zero_frac is not None else "-",
            ]
        )
    head = ["method", "trials", "complete", "pruned", "(diverged)", "failed", "running", "best", "val_top1", "zeroed"]
    notes = [
        f"{r.task.label}: +{r.counts['INTERRUPTED']} interrupted, not counted (the next run replaces them)"
        for r in results
        if r.counts["INTERRUPTED"]
    ]
    return "\n".join([tabulate(rows, headers=head, disable_numparse=True), *notes])


def log_study(study: Any, result: StudyResult) -> None:
    """The active (study) run's counts, best parameters, ``trials.csv`` and plots."""
    c = result.counts
    runs.log_final(
        dict(
            zip(
                schema.STUDY_METRICS,
                (result.n_trials, c["COMPLETE"], c["PRUNED"], c["FAIL"], result.diverged, result.best_value),
                strict=True,
            )
        )
    )
    if result.best_params is not None:
        store.retry(mlflow.log_params, {f"{schema.BEST_PARAM_PREFIX}{k}": v for k, v in result.best_params.items()})
        runs.set_tags({schema.BEST_PARAMS_TAG: json.dumps(result.best_params)})
    try:
        runs.log_text(study.trials_dataframe().to_csv(index=False), schema.TRIALS_ARTIFACT)
    except Exception as exc:  # an odd study: the plots and params still go in
        log.warning("  (no %s: %s)", schema.TRIALS_ARTIFACT, one_line(exc))
    skipped = log_plots(study)
    if skipped:
        log.info("  plots skipped: %s", "; ".join(f"{name} ({reason})" for name, reason in skipped))


# artifact name -> (function of optuna.visualization.matplotlib, completed trials it needs)
PLOTS: dict[str, tuple[str, int]] = {
    "optimization_history": ("plot_optimization_history", 1),
    "param_importances": ("plot_param_importances", 2),
    "slice": ("plot_slice", 1),
    "intermediate_values": ("plot_intermediate_values", 1),
}


def log_plots(study: Any) -> list[tuple[str, str]]:
    """Optuna's plots as PNG artifacts under ``plots/`` of the active run; returns the ones skipped and why."""
    matplotlib.use("Agg")  # Optuna draws with pyplot: no display, whatever the environment says
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
                runs.log_file(path, schema.PLOTS_ARTIFACT_DIR)
            except (ValueError, RuntimeError, ImportError, optuna.exceptions.OptunaError) as exc:
                skipped.append((name, one_line(exc)))
            finally:
                plt.close("all")
    return skipped
