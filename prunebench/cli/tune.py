"""``prunebench tune RECIPE``: the options, the recipe's ``tune:`` section with them applied, and the product
printed on stdout (the closing table and the tuned recipe's path). The work is
:func:`prunebench.commands.tune.tune_recipe`, imported when the command runs (it loads Optuna and MLflow).
See docs/architecture.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from prunebench.errors import UserError

if TYPE_CHECKING:
    from prunebench.recipe import Recipe, TuneConfig

log = logging.getLogger(__name__)


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
        "  prunebench tune recipe.yaml --executor ray --workers 4   # 4 workers per study on Ray\n"
        "  prunebench run quickstart.tuned.yaml && prunebench compare --experiment quickstart\n\n"
        "--trials is the total each study should reach: rerun with a larger number to add trials.",
    )
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        metavar="N",
        help="total trials per study, topped up on resume (default: tune.trials, 20)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="per method: start no new trial after S seconds (default: tune.timeout, none)",
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage, e.g. sqlite:///optuna.db or postgresql://user:pw@host/db "
        "(default: tune.storage, else optuna.db beside the MLflow SQLite store)",
    )
    p.add_argument(
        "--study",
        default=None,
        metavar="NAME",
        help="study name (one method) or prefix (several; default <recipe name>-<method>)",
    )
    p.add_argument("--methods", default=None, metavar="A,B", help="tune only these methods of the recipe")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key as in `prunebench run` (e.g. -o tune.finetune_epochs=2)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="where to write the tuned recipe (default: <recipe stem>.tuned.yaml here)",
    )
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: the studies one after another in this process (default); ray: --workers Optuna workers per "
        "study as Ray tasks on the one storage (resources per task: the recipe's executor.resources; needs "
        "prunebench[scale])",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="with --executor ray: Optuna workers per study, sharing its --trials (default 1)",
    )
    p.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="with --executor ray: join this running Ray cluster (the address `ray start --head` prints); "
        "default: a local Ray instance. Workers on other machines need a --storage and tracking URI they reach",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars and no progress messages: warnings, errors and the result only",
    )


def tune_config(recipe: Recipe, args: argparse.Namespace) -> TuneConfig:
    """The recipe's ``tune:`` section (defaults when it has none) with the command-line options applied."""
    from pydantic import ValidationError

    from prunebench.recipe import TuneConfig

    cli = {"trials": args.trials, "timeout": args.timeout, "storage": args.storage}
    base = (recipe.tune or TuneConfig()).model_dump()
    try:
        return TuneConfig.model_validate({**base, **{k: v for k, v in cli.items() if v is not None}})
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UserError(f"--{e['loc'][0]} {e.get('input')!r}: {e['msg']}") from None


def run(args: argparse.Namespace) -> int:
    """0, 1 when a study ends without any completed trial, 130/143 when interrupted (resume: the same command)."""
    from prunebench.commands.tune import format_summary, tune_recipe
    from prunebench.registry import load_recipe
    from prunebench.signals import Interrupted

    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: give 1 or more")
    if args.executor != "ray" and (args.workers > 1 or args.address):
        flag = "--address names a Ray cluster" if args.address else "--workers runs Optuna workers as Ray tasks"
        raise UserError(
            f"{flag}; add --executor ray (or, without Ray, start `prunebench tune` once per worker on one --storage)"
        )
    source = Path(args.recipe)
    recipe = load_recipe(source, args.override, allow_spaces=True)
    cfg = tune_config(recipe, args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        outcome = tune_recipe(
            recipe,
            cfg,
            source=source,
            overrides=args.override,
            methods=methods,
            study=args.study,
            out=Path(args.out) if args.out else None,
            quiet=args.quiet,
            executor=args.executor,
            workers=args.workers,
            address=args.address,
        )
    except Interrupted as exc:  # the command said what was kept and how to resume
        return exc.exit_code
    print("\n" + format_summary(outcome.results))
    print(f"\ntuned recipe: {outcome.out}", flush=True)
    return outcome.exit_code
