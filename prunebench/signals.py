"""SIGINT and SIGTERM: the one place prunebench installs signal handlers.

* :func:`handle_signals` turns the first SIGINT/SIGTERM into :class:`Interrupted` (a KeyboardInterrupt:
  the runs it unwinds through end KILLED); later signals are ignored while the bookkeeping finishes.
* :func:`signals_held` defers both signals around a write that must complete (a checkpoint and the
  metrics that go with it); they are delivered, to whatever handler is installed, right after.

Both do nothing outside the main thread, where Python delivers no signals.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
log = logging.getLogger(__name__)
_holding = False  # a signals_held() block is open (main thread only)
_received: int | None = None  # the signal handle_signals() last turned into Interrupted


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. Raised in the main thread (never inside a held write); the process should
    exit with :attr:`exit_code`."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _restore(previous: dict[int, Any]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` for the duration of the block (the first one only)."""
    if not _main_thread():
        yield
        return
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if stopping:
            log.warning("prunebench: already stopping; marking the runs KILLED")
            return
        stopping = True
        global _received
        _received = signum
        raise Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
    try:
        yield
    finally:
        _restore(previous)


def as_interrupted(exc: KeyboardInterrupt) -> Interrupted:
    """``exc`` as :class:`Interrupted`: a library that turns the handler's exception into a plain
    ``KeyboardInterrupt`` (Ray's waits do) loses which signal it was; the one received says it."""
    if isinstance(exc, Interrupted):
        return exc
    return Interrupted(_received or signal.SIGINT)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for the duration of the block, then deliver them (nested blocks are part
    of the outermost one)."""
    global _holding
    if _holding or not _main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in SIGNALS}
    _holding = True
    try:
        yield
    finally:
        _holding = False
        _restore(previous)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)
