"""Files prunebench writes and reads back: one atomic write, one lock, one load path.

* :func:`atomic_write` -- temporary file in the same folder, fsync, rename, with SIGINT/SIGTERM held
  back until the rename is done: an interrupted run never leaves a torn file under the real name.
* :func:`file_lock` / :func:`sqlite_lock` -- inter-process locks (a dense model trained once; a SQLite
  database created by one process at a time, since two fresh schema migrations collide).
* :func:`load_torch` -- ``torch.load(weights_only=True)``: nothing in a file can run code.
  :func:`load_cached` is the load path for files prunebench itself cached: a corrupt one is named in a
  warning, moved aside (``<name>.corrupt``) and reported missing, so the caller recomputes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from filelock import FileLock

from prunebench.errors import one_line
from prunebench.signals import signals_held

log = logging.getLogger(__name__)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with signals_held():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def file_lock(path: str | Path, timeout: float = -1) -> FileLock:
    """An inter-process lock guarding ``path`` (the lock file is ``<path>.lock``; folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=timeout)


@contextmanager
def sqlite_lock(url: str, timeout: float = 300) -> Iterator[None]:
    """Serialize first use of a SQLite database (``sqlite:///path``) between processes; no-op for other URLs.

    The lock file lives in the temporary folder, named by a hash of the database's absolute path, so
    nothing is left beside the database (SQLite is shared by the processes of one machine only).
    """
    if not url.startswith("sqlite:///"):
        yield
        return
    db = Path(url.removeprefix("sqlite:///")).resolve()
    key = hashlib.sha1(str(db).encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"prunebench-sqlite-{key}.lock"), timeout=timeout):
        yield


def load_torch(path: str | Path) -> Any:
    """Load a torch file onto the CPU without executing code from it (raises whatever torch raises)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_cached(path: str | Path) -> Any | None:
    """A file prunebench cached, or ``None`` when it is missing or unreadable.

    An unreadable file (truncated, from an incompatible version, not a torch file) is moved aside to
    ``<path>.corrupt`` with one warning naming it, so the caller recomputes it and the next run does not
    trip over it again.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load_torch(path)
    except Exception as exc:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning(
            "cached file %s cannot be read (%s); moved it to %s and computing it again",
            path,
            one_line(exc, 160),
            aside.name,
        )
        return None
