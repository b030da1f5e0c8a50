"""``prunebench compare``: the options, and the table printed on stdout. The work is done by
:mod:`prunebench.commands.compare`, imported when the command runs (it reads MLflow, draws with matplotlib).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# The same as prunebench.commands.compare.FORMATS (a test keeps them equal): spelled out so that building the
# parser does not import MLflow.
FORMATS = ("text", "md", "csv", "html", "json")

DESCRIPTION = (
    "Read the cells of `prunebench run` invocations (or of any runs that follow the prunebench tracking schema) "
    "back from MLflow and compare methods: mean ± sample sd and n over seeds of test top-1 and its per-seed "
    "differences to the dense model, to the dense model trained for the same extra epochs (when such control runs "
    "exist) and to the best method at the target, MACs, params, latency, speedup and the share of channels zeroed "
    "by sparsity training, with one dense and one dense-control row per model/dataset. Per target, the best method "
    "is starred and its lead over the runner-up is tested with a two-sided paired t-test on the per-seed "
    "differences (methods of a seed share the dense model and data order); Welch's t-test where the two seed sets "
    "differ."
)
EPILOG = """\
examples:
  prunebench compare                                  # latest invocation of the only experiment
  prunebench compare --experiment quickstart --out reports/quickstart   # + report.html, logged to MLflow
  prunebench compare --all-runs --filter "params.method != 'random'" --format md
  prunebench compare --run-id 3f2a... --format json > table.json"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``prunebench compare`` and its options."""
    p = subparsers.add_parser(
        "compare",
        help="side-by-side table, seed statistics and plots of runs read back from MLflow",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sel = p.add_argument_group("selection")
    sel.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)",
    )
    sel.add_argument(
        "--experiment",
        "-e",
        metavar="NAME",
        help="experiment (the recipe's name); default: the only experiment besides Default",
    )
    which = sel.add_mutually_exclusive_group()
    which.add_argument(
        "--run-id",
        action="append",
        default=[],
        metavar="ID",
        help="parent run of one `prunebench run` invocation (repeatable); default: the latest",
    )
    which.add_argument(
        "--all-runs",
        action="store_true",
        help="every invocation of the experiment (a repeated cell counts once, its latest run)",
    )
    sel.add_argument(
        "--filter",
        metavar="EXPR",
        dest="filter_string",
        help="MLflow filter string on the cell runs, e.g. \"params.method = 'oicsr'\" (dense "
        "controls follow the seeds of the selected cells)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--format",
        "-f",
        choices=FORMATS,
        default="text",
        help="what to print on stdout (default: an aligned text table)",
    )
    out.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="also write table.md, table.csv, table.html, table.json, the PNG plots and report.html (the table, "
        "verdicts, notes and every plot in one self-contained file) into DIR, and log these files to the selected "
        "parent run(s) in MLflow, under the artifact folder compare/ (not done when the cells have no parent run; "
        "a store that refuses the files is a warning)",
    )
    out.add_argument(
        "--layers-target",
        type=float,
        metavar="T",
        help="target of the per-layer channels and sorted-norms plots (default: the smallest target)",
    )
    out.add_argument("--no-plots", action="store_true", help="with --out, write the tables and report.html only")
    out.add_argument(
        "--no-log", action="store_true", help="with --out, write the files only: do not log them to MLflow"
    )
    out.add_argument(
        "--alpha", type=float, default=0.05, help="significance level of the t-test verdicts (default: 0.05)"
    )
    out.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print the table only: no message about the files written (warnings still shown)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the comparison (and write ``--out``); returns the exit status."""
    from prunebench.commands.compare import CompareConfig, compare

    config = CompareConfig(
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        run_ids=args.run_id,
        all_runs=args.all_runs,
        filter_string=args.filter_string,
        format=args.format,
        out=args.out,
        layers_target=args.layers_target,
        plots=not args.no_plots,
        log=not args.no_log,
        alpha=args.alpha,
    )
    report = compare(config)
    print(report.text, end="" if report.text.endswith("\n") else "\n")
    if report.written and args.format == "text":  # other formats are machine-read from stdout: nothing else there
        names = ", ".join(str(p.relative_to(args.out)) for p in report.written)
        log.info("\nwrote %d files to %s: %s", len(report.written), args.out, names)
        for run_id in report.logged_to:
            log.info("logged them to MLflow, parent run %s", run_id)
    return 0
