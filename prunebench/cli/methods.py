"""``prunebench methods``: the registered pruning methods (built-ins and plugins) with their parameters
(docs/methods.md)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "methods",
        help="list registered pruning methods",
        description="List the registered pruning methods (built-ins, entry-point plugins) with their "
        "parameters and a one-line description.",
    )


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from prunebench.registry import available_methods

    rows = []
    for name, cls in available_methods().items():
        params = ", ".join(f"{f.alias or k}={f.default!r}" for k, f in cls.Params.model_fields.items())
        rows.append([name, cls.description + (f"  [{params}]" if params else "")])
    print(tabulate(rows, tablefmt="plain", disable_numparse=True))
    return 0
