"""The ``prunebench`` command line.

Exit status: 0 success, 1 a run failed (a cell raised or diverged), 2 bad input (a message naming the
problem and the fix, no traceback), 130/143 interrupted by SIGINT/SIGTERM (``run`` prints how to resume).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from collections.abc import Sequence

from prunebench.errors import UserError

# Subcommands that live in their own module expose add_parser(subparsers) and run(args) -> int.
_MODULE_COMMANDS = ("compare", "tune", "bench")

EPILOG = """\
examples:
  prunebench run recipes/quickstart.yaml                   # the offline demo (digits, a few minutes on a CPU)
  prunebench run recipes/cifar10_resnet56.yaml -o seeds=1  # override any recipe key (value parsed as YAML)
  prunebench run recipes/cifar10_resnet56.yaml --resume    # after a crash or Ctrl-C: skip finished cells
  prunebench compare --out reports/quickstart              # tables and plots from MLflow
  prunebench methods                                       # registered pruning methods
  prunebench models '*cifar*'                              # models usable in a recipe
"""


def _add_run(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key; repeatable; the value is parsed as YAML")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (for logs and CI)")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, print the resolved version and stop")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest run of this same recipe: skip its finished cells, continue the others "
                   "from their last checkpoints in their own MLflow runs (nothing to resume: a normal run)")


def resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this ``prunebench run`` invocation."""
    argv = [args.recipe, *(a for o in args.override for a in ("-o", o)), *(["-q"] if args.quiet else []), "--resume"]
    return "prunebench run " + shlex.join(argv)


def _run(args: argparse.Namespace) -> int:
    from prunebench.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.override)
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return 0
    from prunebench.commands.run import format_summary, run_recipe
    from prunebench.signals import Interrupted, handle_signals

    try:
        with handle_signals():
            summary = run_recipe(recipe, quiet=args.quiet, resume=args.resume)
    except Interrupted as exc:
        print(f"\nprunebench: stopped by {exc.signal_name}; unfinished cells are marked KILLED in MLflow and keep "
              f"their last checkpoint. Resume with:\n  {resume_command(args)}", file=sys.stderr)
        return exc.exit_code
    print(format_summary(summary))
    if summary.failed:
        cells = [c for c in summary.failed if not c.control]
        controls = len(summary.failed) - len(cells)
        print(f"\n{len(cells)} of {len(summary.grid)} cells failed"
              + (f" and {controls} dense control run(s)" if controls else "")
              + " (details: the run's prunebench.error tag and traceback.txt):", file=sys.stderr)
        for c in summary.failed:
            print(f"  {c.describe()}: {c.error}", file=sys.stderr)
        print(f"Retry them (finished cells are skipped) with:\n  {resume_command(args)}", file=sys.stderr)
        return 1
    return 0


def _add_methods(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("methods", help="list registered pruning methods",
                   description="List the registered pruning methods (built-ins, entry-point plugins) with their "
                   "parameters and a one-line description.")


def _methods(args: argparse.Namespace) -> int:
    from prunebench.registry import available_methods

    methods = available_methods()
    width = max(len(n) for n in methods)
    for name, cls in methods.items():
        params = ", ".join(f"{f.alias or k}={f.default!r}" for k, f in cls.Params.model_fields.items())
        print(f"{name:<{width}}  {cls.description}" + (f"  [{params}]" if params else ""))
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list models usable in a recipe (timm names, CIFAR models first)",
                       description="List model names for a recipe's model.name: the CIFAR models prunebench "
                       "registers into timm, then every timm model. PATTERN is a shell-style wildcard.")
    p.add_argument("pattern", nargs="?", default=None, help="e.g. '*cifar*' or 'resnet*'")


def _models(args: argparse.Namespace) -> int:
    from prunebench.models import list_models

    names = list_models(args.pattern)
    if not names:
        raise UserError(f"no model matches {args.pattern!r}; try 'prunebench models' without a pattern")
    print("\n".join(names))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunebench",
        description="A fair, reproducible benchmark harness for structured (channel) pruning of CNNs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    from prunebench import __version__

    parser.add_argument("--version", action="version", version=f"prunebench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    for name in _MODULE_COMMANDS:
        try:
            module = importlib.import_module(f"prunebench.commands.{name}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"prunebench.commands.{name}.{name}":
                raise
            continue
        module.add_parser(sub)
    _add_methods(sub)
    _add_models(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"run": _run, "methods": _methods, "models": _models}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        return importlib.import_module(f"prunebench.commands.{args.command}.{args.command}").run(args)
    except UserError as exc:
        print(f"prunebench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("prunebench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `prunebench compare | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
