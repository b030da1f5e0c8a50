"""``prunebench run``: a recipe expanded into cells (methods x seeds x targets), each trained, pruned,
fine-tuned, measured and logged to MLflow. One module per job: :mod:`.context` (shared state and the
pre-run checks), :mod:`.dense` (the dense start), :mod:`.phases` (training and pruning a cell),
:mod:`.cell` (a cell in its MLflow run), :mod:`.grid` (the whole recipe), :mod:`.summary` (results and
the closing table). See docs/architecture.md and docs/fairness.md."""

from prunebench.commands.run.cell import run_cell, run_control
from prunebench.commands.run.context import Context, check_regularizers, load_user_checkpoint, preflight
from prunebench.commands.run.dense import dense_model
from prunebench.commands.run.grid import run_recipe
from prunebench.commands.run.phases import CONTROL, CONTROL_LABEL, CellCheckpoints, Phase, cell_phases, train_and_prune
from prunebench.commands.run.summary import CellResult, RunSummary, format_summary

__all__ = [
    "CONTROL",
    "CONTROL_LABEL",
    "CellCheckpoints",
    "CellResult",
    "Context",
    "Phase",
    "RunSummary",
    "cell_phases",
    "check_regularizers",
    "dense_model",
    "format_summary",
    "load_user_checkpoint",
    "preflight",
    "run_cell",
    "run_control",
    "run_recipe",
    "train_and_prune",
]
