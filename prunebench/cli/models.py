"""``prunebench models [PATTERN]``: model names a recipe's ``model.name`` accepts (the CIFAR models
prunebench registers into timm first, then timm's)."""

from __future__ import annotations

import argparse

from prunebench.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list models usable in a recipe (timm names, CIFAR models first)",
        description="List model names for a recipe's model.name: the CIFAR models prunebench "
        "registers into timm, then every timm model. PATTERN is a shell-style wildcard.",
    )
    p.add_argument("pattern", nargs="?", default=None, help="e.g. '*cifar*' or 'resnet*'")


def run(args: argparse.Namespace) -> int:
    from prunebench.models import list_models

    names = list_models(args.pattern)
    if not names:
        raise UserError(f"no model matches {args.pattern!r}; try 'prunebench models' without a pattern")
    print("\n".join(names))
    return 0
