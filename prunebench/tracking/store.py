"""The connection to an MLflow tracking store, shared by every command: URI resolution, fail-fast checks
and retries while SQLite is busy (several processes may share one store file).

An unreachable server is refused in :data:`CONNECT_TIMEOUT_S` seconds with one :class:`UserError` line,
whether the command writes (``run``, ``tune``) or reads (``compare``): :func:`connect` and :func:`client`.
"""

from __future__ import annotations

import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Experiment
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from prunebench import distributed
from prunebench.errors import UserError, one_line
from prunebench.files import sqlite_lock
from prunebench.tracking.schema import DEFAULT_URI, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

CONNECT_TIMEOUT_S = 5  # an unreachable server fails the command in seconds, before any work
WHERE_URI = "tracking.uri in the recipe, --tracking-uri, or MLFLOW_TRACKING_URI"
DATABASES = ("postgresql", "mysql", "mariadb", "mssql", "oracle")  # SQLAlchemy URLs whose driver is a separate package
SCALE_EXTRA = "pip install 'prunebench[scale]'"
# the package to install where a driver module's name is not the package's
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}


def quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def resolve_uri(uri: str | None) -> str:
    """The recipe's URI, else ``$MLFLOW_TRACKING_URI``, else the SQLite default.

    A relative SQLite path is made absolute: it names a file in the working directory *now*, and MLflow
    caches stores by URI string, so a relative URI would go stale after a change of directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def _mentions(exc: BaseException, *needles: str) -> bool:
    """Whether any exception in ``exc``'s cause chain mentions one of ``needles`` (lower case)."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(n in str(seen).lower() for n in needles):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_busy(exc: BaseException) -> bool:
    """SQLite's "database is locked": another process holds the write lock; worth waiting for."""
    return _mentions(exc, "database is locked", "database table is locked")


def is_race(exc: BaseException) -> bool:
    """Busy, or two processes creating the same tables or experiment at once (the second finds it next time)."""
    return is_busy(exc) or _mentions(exc, "already exists", "unique constraint failed")


_jitter = random.Random()  # not the global generator: retries must not shift a run's random draws


def retry(
    fn: Callable[..., Any],
    *args: Any,
    attempts: int = 10,
    transient: Callable[[BaseException], bool] = is_busy,
    **kwargs: Any,
) -> Any:
    """``fn(*args, **kwargs)``, retried with exponential backoff (about 10 s in all) while SQLite is locked."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts - 1 or not transient(exc):
                raise
            time.sleep(delay * (1 + _jitter.random()))
            delay = min(2 * delay, 2.0)
    raise AssertionError("unreachable")


def probe(uri: str) -> None:
    """Fail fast if an HTTP tracking server does not answer (any HTTP status counts as an answer)."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"tracking URI {uri!r} cannot be reached ({reason}); start the MLflow server or fix the URI ({WHERE_URI})"
        ) from None


@contextmanager
def fail_fast() -> Iterator[None]:
    """No HTTP retries and a short timeout while connecting (restored afterwards: a long run keeps them)."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CONNECT_TIMEOUT_S)}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_driver(url: str, what: str) -> None:
    """Refuse a database URL (``postgresql://``, ``mysql+pymysql://``...) whose Python driver is not installed,
    with one line naming what to install, before any connection or work. ``what`` names the URL in the message.

    The driver is the one SQLAlchemy picks for the URL's dialect (``postgresql://`` means psycopg from
    SQLAlchemy 2.1 on, which the ``scale`` extra installs).
    """
    if url.partition(":")[0].partition("+")[0].lower() not in DATABASES:
        return
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except Exception:  # not a URL SQLAlchemy parses, or an unknown driver: the connection reports it
        return
    try:
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()  # dbapi(): SQLAlchemy 1.4
    except ImportError as exc:
        module = exc.name or one_line(exc)
        install = f"pip install {DRIVER_PACKAGES.get(module, module)}"
        shown = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "postgresql":
            fix = SCALE_EXTRA if module == "psycopg" else f"{install}, or use postgresql:// and {SCALE_EXTRA}"
        else:
            fix = install
        raise UserError(
            f"{what} {shown!r} needs the database driver {module!r}, which is not installed: {fix}"
        ) from None


def check_uri(uri: str | None) -> str:
    """Checks that need no connection: a SQLite file's folder exists and is writable, a database URL's driver
    is installed (:func:`check_driver`). Returns the URI."""
    uri = resolve_uri(uri)
    check_driver(uri, "tracking URI")
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        parent = db.parent if str(db.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UserError(
                f"tracking URI {uri!r}: folder {str(parent)!r} does not exist or is not writable; "
                "set tracking.uri or MLFLOW_TRACKING_URI to a writable location"
            )
    return uri


def connect(uri: str | None, experiment: str) -> str:
    """Point MLflow at ``uri`` and select ``experiment`` (created if new, and tagged as model training by
    :func:`mark_experiment`); fail *before* any training if unreachable. Only rank 0 of a ``torchrun`` launch
    connects (the others never call into MLflow: :mod:`prunebench.tracking.runs`)."""
    quiet_mlflow()
    uri = check_uri(uri)
    if not distributed.is_main():
        return uri
    if uri.startswith(("http://", "https://")):
        probe(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with fail_fast(), sqlite_lock(uri):
            exp = retry(mlflow.set_experiment, experiment, transient=is_race)
            mark_experiment(exp)
    except Exception as exc:  # unreachable server, bad scheme, deleted experiment, locked file...
        raise UserError(
            f"tracking URI {uri!r} cannot be used ({one_line(exc)}); start the server or fix the URI ({WHERE_URI})"
        ) from None
    return uri


def mark_experiment(exp: Experiment) -> None:
    """Tag ``exp`` as model training (``EXPERIMENT_KIND_TAG``), so MLflow 3's UI opens its runs rather than the
    GenAI traces page; a kind already set (by the user, or another tool) is left as it is."""
    if EXPERIMENT_KIND_TAG not in exp.tags:
        retry(MlflowClient().set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def client(uri: str | None) -> MlflowClient:
    """A client for reading ``uri`` (``compare``): an HTTP server that does not answer is refused in seconds,
    and reads are not retried for minutes (MLflow's default) when the server goes away."""
    quiet_mlflow()
    uri = resolve_uri(uri)
    check_driver(uri, "tracking URI")
    if uri.startswith(("http://", "https://")):
        probe(uri)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(6 * CONNECT_TIMEOUT_S))
    return MlflowClient(tracking_uri=uri)
