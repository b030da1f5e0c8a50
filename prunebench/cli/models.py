"""``prunebench models [PATTERN...]``: model names a recipe's ``model.name`` accepts (the CIFAR models
prunebench registers into timm first, then timm's). With ``--check``: the model-zoo report of
:mod:`prunebench.commands.models` (groups, reach and cuts per model), written to ``--out``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prunebench.errors import UserError

log = logging.getLogger(__name__)

DEFAULTS = {"out": "reports/timm", "size": 64}
"""The option defaults of ``--check`` (:class:`~prunebench.commands.models.ZooConfig`'s ``size``; tests check
that they agree)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list models usable in a recipe (timm names, CIFAR models first); --check: the model-zoo report",
        description="List model names for a recipe's model.name: the CIFAR models prunebench registers into "
        "timm, then every timm model. PATTERN is a shell-style wildcard. With --check: build each model "
        "(random weights, nothing downloaded; default: one timm CNN per family and the CIFAR ResNets), count "
        "its prunable groups per scope, the largest MACs reduction each scope reaches, and whether every "
        "method cuts it to 30% and 50% fewer MACs; write <out>/models.md and <out>/models.json.",
    )
    p.add_argument("pattern", nargs="*", help="model names or wildcards, e.g. '*cifar*' or 'resnet*'")
    p.add_argument("--check", action="store_true", help="check the models (default: one per family) and report")
    p.add_argument("--out", default=None, help=f"report folder for --check (default: {DEFAULTS['out']})")
    p.add_argument(
        "--size", type=int, default=None, help=f"input size in pixels for --check (default: {DEFAULTS['size']})"
    )
    p.add_argument(
        "--methods", default=None, help="comma-separated methods for --check (default: every registered one)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages: warnings, errors and the table")


def command_line(args: argparse.Namespace) -> list[str]:
    """The ``--check`` command that reproduces this report (recorded in it)."""
    argv = ["models", "--check", *args.pattern, "--size", str(args.size), "--out", str(args.out)]
    return argv + (["--methods", args.methods] if args.methods else [])


def run(args: argparse.Namespace) -> int:
    if args.check:
        return _check(args)
    given = [f"--{k}" for k in ("out", "size", "methods") if getattr(args, k) is not None]
    if given:
        raise UserError(f"{', '.join(given)} only apply with --check")
    from prunebench.models import list_models

    names = list_models(None) if not args.pattern else [n for p in args.pattern for n in list_models(p)]
    if not names:
        raise UserError(
            f"no model matches {' '.join(map(repr, args.pattern))}; try 'prunebench models' without a pattern"
        )
    print("\n".join(dict.fromkeys(names)))
    return 0


def _check(args: argparse.Namespace) -> int:
    from prunebench.commands.models import ZooConfig, check_models, format_summary, resolve_models, write_report

    args.out = args.out if args.out is not None else DEFAULTS["out"]
    args.size = args.size if args.size is not None else DEFAULTS["size"]
    methods = tuple(m.strip() for m in (args.methods or "").split(",") if m.strip()) or None
    cfg = ZooConfig(models=resolve_models(args.pattern), size=args.size, methods=methods)
    out = Path(args.out)
    doc = check_models(cfg, command=command_line(args), quiet=args.quiet, after_each=lambda d: write_report(d, out))
    md, js = write_report(doc, out)
    print(format_summary(doc, tablefmt="plain"))
    log.info("wrote %s and %s", md, js)
    return 0
