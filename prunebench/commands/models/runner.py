"""The whole ``prunebench models --check``: every model in turn (a tqdm bar over them, one log line each),
then the report. See :mod:`prunebench.commands.models`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from prunebench.commands.models.check import ModelCheck, check_model
from prunebench.commands.models.config import ZooConfig
from prunebench.commands.models.report import build_document
from prunebench.registry import available_methods, get_method

log = logging.getLogger(__name__)


def check_models(
    cfg: ZooConfig,
    command: Sequence[str] = ("models", "--check"),
    quiet: bool = False,
    after_each: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Check every model of ``cfg`` and return the JSON report (:func:`build_document`); ``command`` is the
    command line recorded in it (without the leading ``prunebench``). ``after_each`` gets the report so far
    after every model (the command writes it, so a long check leaves a partial report behind). An unknown
    method name is a :class:`~prunebench.errors.UserError`; a model or method that fails is a row of the
    report, not an error."""
    methods = {n: get_method(n) for n in cfg.methods} if cfg.methods is not None else available_methods()
    start = time.perf_counter()
    checks: list[ModelCheck] = []
    bar = tqdm(cfg.models, desc="models", unit="model", disable=quiet, leave=False, dynamic_ncols=True)
    with _threads(cfg.threads):
        for name in bar:
            bar.set_postfix_str(name)
            result = check_model(name, cfg, methods)
            checks.append(result)
            log.info("%s", _line(result, len(methods) * len(cfg.targets)))
            if after_each is not None:
                after_each(build_document(checks, cfg, list(methods), command, time.perf_counter() - start))
    return build_document(checks, cfg, list(methods), command, time.perf_counter() - start)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """``n`` torch threads for the check (the previous count restored after it)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _line(m: ModelCheck, n_cuts: int) -> str:
    if m.error is not None:
        return f"{m.model}: FAILED ({m.stage}, {m.seconds:.0f} s): {m.error}"
    ok = sum(c.ok for c in m.cuts)
    return (
        f"{m.model}: {m.groups.get('internal', 0)} internal / {m.groups.get('all', 0)} groups "
        f"({m.groups_seconds:.1f} s), reach internal {m.reach.get('internal', 0):.3f} / all "
        f"{m.reach.get('all', 0):.3f}, {ok}/{n_cuts} cuts on target ({m.seconds:.0f} s)"
    )
