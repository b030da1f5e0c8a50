"""``prunebench run RECIPE``: the parser, and the printing of the summary table and of how to resume.
The work is :func:`prunebench.commands.run.run_recipe` (docs/architecture.md)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a recipe: dense -> sparsity training -> prune -> fine-tune -> measure, logged to MLflow",
        description="Run every cell (method x seed x target) of a recipe and log it to MLflow. The dense model of "
        "each seed is trained once and cached (see the recipe's workdir); every method of that seed starts from it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides:\n  -o finetune.epochs=2  -o seeds=[0]  -o 'methods=[{name: l1}]'  -o prune.target=[0.3,0.5]\n"
        "  -o methods[0].lambda=1e-4\n\ntracking: MLflow URI from tracking.uri, else $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db in the working directory.",
    )
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key; repeatable; the value is parsed as YAML",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars and no progress messages (for logs and CI)"
    )
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, print the resolved version and stop")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest run of this same recipe: skip its finished cells, continue the others "
        "from their last checkpoints in their own MLflow runs (nothing to resume: a normal run)",
    )
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: every cell in this process, one after another (default); ray: the dense models, then every "
        "cell, as Ray tasks (resources per task: the recipe's executor.resources; needs prunebench[scale])",
    )
    p.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="with --executor ray: join this running Ray cluster (the address `ray start --head` prints); "
        "default: start a local Ray instance on this machine",
    )


def resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this ``prunebench run`` invocation."""
    argv = [args.recipe, *(a for o in args.override for a in ("-o", o)), *(["-q"] if args.quiet else [])]
    if args.executor != "local":
        argv += ["--executor", args.executor, *(["--address", args.address] if args.address else [])]
    argv.append("--resume")
    return "prunebench run " + shlex.join(argv)


def run(args: argparse.Namespace) -> int:
    from prunebench.commands.run import format_summary, run_recipe
    from prunebench.errors import UserError
    from prunebench.recipe import dump_recipe
    from prunebench.registry import load_recipe
    from prunebench.signals import Interrupted, handle_signals

    if args.address and args.executor != "ray":
        raise UserError("--address names a Ray cluster; add --executor ray")
    recipe = load_recipe(args.recipe, args.override)
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return 0
    try:
        with handle_signals():
            summary = run_recipe(
                recipe, quiet=args.quiet, resume=args.resume, executor=args.executor, address=args.address
            )
    except Interrupted as exc:
        log.warning(
            "\nprunebench: stopped by %s; unfinished cells are marked KILLED in MLflow and keep their last "
            "checkpoint. Resume with:\n  %s",
            exc.signal_name,
            resume_command(args),
        )
        return exc.exit_code
    if os.environ.get("RANK", "0") == "0":  # under torchrun the table is said once, by rank 0
        print(format_summary(summary), flush=True)
    if summary.failed:
        cells = [c for c in summary.failed if not c.control]
        controls = len(summary.failed) - len(cells)
        log.error(
            "\n%s of %s cells failed%s (details: the run's prunebench.error tag and traceback.txt):",
            len(cells),
            len(summary.grid),
            f" and {controls} dense control run(s)" if controls else "",
        )
        for c in summary.failed:
            log.error("  %s: %s", c.describe(), c.error)
        log.error("Retry them (finished cells are skipped) with:\n  %s", resume_command(args))
        return 1
    return 0
