"""The ``prunebench`` command line: argparse and logging only. Each subcommand is a module here exposing
``add_parser(subparsers)`` and ``run(args) -> int``; ``run`` imports the command's implementation
(:mod:`prunebench.commands`) when it runs, so ``prunebench --help`` stays fast. See docs/architecture.md.

Exit status: 0 success, 1 a run failed (a cell raised or diverged), 2 bad input (a message naming the
problem and the fix, no traceback), 130/143 interrupted by SIGINT/SIGTERM (``run`` prints how to resume).
Messages are log records of the ``prunebench`` logger: INFO and below on stdout, WARNING and above on
stderr; ``-q`` shows only warnings and errors (and turns off progress bars).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

from prunebench import __version__
from prunebench.cli import bench, compare, methods, models, run, tune
from prunebench.errors import UserError, one_line
from prunebench.hostmem import keep_freed_memory

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  prunebench run recipes/quickstart.yaml                   # the offline demo (digits, a few minutes on a CPU)
  prunebench run recipes/cifar10_resnet56.yaml -o seeds=1  # override any recipe key (value parsed as YAML)
  prunebench run recipes/cifar10_resnet56.yaml --resume    # after a crash or Ctrl-C: skip finished cells
  prunebench compare --out reports/quickstart              # tables and plots from MLflow
  prunebench methods                                       # registered pruning methods
  prunebench models '*cifar*'                              # models usable in a recipe
"""


COMMANDS: dict[str, ModuleType] = {
    "run": run,
    "compare": compare,
    "tune": tune,
    "bench": bench,
    "methods": methods,
    "models": models,
}
"""The subcommands, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunebench",
        description="A fair, reproducible benchmark harness for structured (channel) pruning of CNNs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"prunebench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


class _ByLevel(logging.Handler):
    """INFO and below to ``sys.stdout``, WARNING and above to ``sys.stderr``; both looked up when a record
    is emitted (so a redirected or captured stream receives it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


@contextmanager
def configure_logging(quiet: bool) -> Iterator[None]:
    """The ``prunebench`` logger's handler and level (INFO, or WARNING with ``-q``) for one command; ERROR on
    the ranks other than 0 of a ``torchrun`` launch, so its messages are said once (rank 0's)."""
    logger = logging.getLogger("prunebench")
    handler = _ByLevel()
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level
    logger.addHandler(handler)
    other_rank = os.environ.get("RANK", "0") != "0" and "LOCAL_RANK" in os.environ
    logger.setLevel(logging.ERROR if other_rank else logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    with configure_logging(getattr(args, "quiet", False)):
        keep_freed_memory()  # page faults would otherwise take a third of a CPU forward pass (hostmem)
        try:
            return COMMANDS[args.command].run(args)
        except UserError as exc:
            log.error("prunebench: error: %s", one_line(exc, 2000))
            return exc.exit_code
        except KeyboardInterrupt:
            log.error("prunebench: interrupted")
            return 130
        except BrokenPipeError:  # e.g. `prunebench compare | head`: the reader left; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0


def entry() -> None:
    sys.exit(main())
