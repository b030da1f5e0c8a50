"""The commands, layered over the core: ``run`` (a recipe's grid), ``compare`` (tables from MLflow),
``tune`` (Optuna studies) and ``bench`` (speed). Each is a subpackage; the argparse front ends live in
:mod:`prunebench.cli`. See docs/architecture.md."""
