"""``prunebench run``: a recipe expanded into cells (methods x seeds x targets), each trained, pruned,
fine-tuned, measured and logged to MLflow. See docs/architecture.md and docs/fairness.md."""

from prunebench.commands.run.pipeline import (CONTROL, CONTROL_LABEL, CellCheckpoints, CellResult, Context, RunSummary,
                                              cell_phases, dense_model, format_summary, preflight, run_recipe,
                                              train_and_prune)

__all__ = ["CONTROL", "CONTROL_LABEL", "CellCheckpoints", "CellResult", "Context", "RunSummary", "cell_phases",
           "dense_model", "format_summary", "preflight", "run_recipe", "train_and_prune"]
