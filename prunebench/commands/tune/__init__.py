"""``prunebench tune``: one Optuna study per tunable method of a recipe (its regularization factor), each trial
scored on the validation split after a short schedule, the same way for every method; the result is a tuned
recipe ``prunebench run`` accepts. Split by job: :mod:`.tasks` (what is searched), :mod:`.objective` (one
trial), :mod:`.study` (storage, sampler, pruner, a study's run), :mod:`.report` (counts, table, plots),
:mod:`.tuned_recipe` and :mod:`.command` (the whole command). See docs/architecture.md and docs/fairness.md.
"""

from prunebench.commands.tune.command import TuneOutcome, tune_recipe
from prunebench.commands.tune.report import StudyResult, format_summary

__all__ = ["StudyResult", "TuneOutcome", "format_summary", "tune_recipe"]
