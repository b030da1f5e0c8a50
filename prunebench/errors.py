"""Errors a user can cause, and keeping libraries' own noise out of what prunebench says.

Anything the user can fix (a bad recipe, an unknown name, a missing dataset) raises :class:`UserError`.
The CLI prints its message on one line and exits with status 2, never a traceback; everything else is a
bug or a failed run and is reported as such. :func:`quiet_loggers` and :func:`native_output_silenced` hush
libraries whose messages prunebench reports once in its own words.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import logging
import os
import sys
from collections.abc import Iterable, Iterator

_LIBC = ctypes.CDLL(None) if os.name == "posix" else None


class UserError(Exception):
    """A problem in the user's input; the message names the problem and the fix."""

    exit_code = 2


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite (a cell or trial fails; a dense model's is a recipe problem)."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (or its type name when empty), cut at ``limit`` characters:
    how an error from a library is quoted inside a :class:`UserError` message or a log line."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def close_matches(name: str, known: Iterable[str], n: int = 3) -> str:
    """A ``did you mean ...?`` hint followed by the list of what exists (for unknown-name errors)."""
    known = sorted(known)
    hits = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(h) for h in hits)}?" if hits else ""
    if len(known) > 30:  # e.g. timm's ~1400 models: the hint is what helps, a partial list is noise
        return hint + f" ({len(known)} known names.)"
    return f"{hint} Known: {', '.join(known)}."


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the named loggers to ``level`` for a block: libraries that log what prunebench reports once in its
    own words (fvcore's skipped operators, the hub's failed requests); their levels come back afterwards."""
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before, strict=True):
            lg.setLevel(lvl)


@contextlib.contextmanager
def native_output_silenced(*fds: int) -> Iterator[None]:
    """Point file descriptors ``fds`` (default 1 and 2) at the null device for a block: native libraries that
    write past ``sys.stdout``/``sys.stderr`` (the TorchScript exporter's graph dumps, the profiler's start and
    stop lines). What C stdio buffered inside the block goes to the null device too."""
    fds = fds or (1, 2)
    _flush_all()
    saved = [os.dup(fd) for fd in fds]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(null, fd)
        yield
    finally:
        _flush_all()
        for fd, copy in zip(fds, saved, strict=True):
            os.dup2(copy, fd)
        for fd in (*saved, null):
            os.close(fd)


def _flush_all() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if _LIBC is not None:
        _LIBC.fflush(None)
