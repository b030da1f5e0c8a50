"""MLflow tracking with the names in docs/design.md (other tools, e.g. ``prunebench compare``, read them).

* Experiment: the recipe's ``name`` (or ``tracking.experiment``).
* One parent run per ``prunebench run`` (tag ``prunebench.kind=parent``), one nested child run per cell
  (tag ``prunebench.kind=cell``).
* Child params: ``method``, ``method_label``, ``seed``, ``target``, ``model``, ``dataset``, ``method.<param>``.
* Child metrics: final ``test_top1``, ``val_top1``, ``dense_test_top1``, ``macs``, ``macs_conv_fc``,
  ``macs_dense``, ``macs_reduction``, ``params``, ``params_dense``, ``params_reduction``, ``latency_ms``,
  ``latency_ms_batch``, ``speedup``; per epoch ``train_loss``, ``train_penalty``, ``val_top1``, ``lr`` with
  ``step`` = the cell's global epoch (tag ``prunebench.stage_epochs`` maps stages to step ranges).
* Artifacts: ``recipe.yaml``, ``layers.csv``, ``model/pruned.pt``.

Default tracking URI: ``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in the working directory.
Only rank 0 of a distributed job may call into this module (see docs/design.md "Scale-out").

Reliability: every call retries with backoff when SQLite reports "database is locked" (several
``prunebench run`` processes may share one store); runs end FINISHED, FAILED (error tags and a
``traceback.txt`` artifact) or KILLED (interrupted); ``--resume`` reopens a parent and its cells by id.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import platform
import random
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prunebench.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
KIND_TAG = "prunebench.kind"
RECIPE_TAG = "prunebench.recipe"
STAGES_TAG = "prunebench.stage_epochs"
RECIPE_KEY_TAG = "prunebench.recipe_key"
CELL_KEY_TAG = "prunebench.cell_key"
ERROR_TAG = "prunebench.error"
FAILURE_TAG = "prunebench.failure"

CONNECT_TIMEOUT_S = 5  # an unreachable server fails the run in seconds, before any training

_PACKAGES = ("prunebench", "torch", "torchvision", "timm", "torch-pruning", "fvcore", "mlflow", "optuna", "pydantic")


def _quiet_mlflow() -> None:
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


def _is_busy(exc: BaseException) -> bool:
    """SQLite's "database is locked": another process holds the write lock; worth waiting for."""
    return _mentions(exc, "database is locked", "database table is locked")


def _is_race(exc: BaseException) -> bool:
    """Busy, or two processes creating the same tables or experiment at once (the second finds it next time)."""
    return _is_busy(exc) or _mentions(exc, "already exists", "unique constraint failed")


_jitter = random.Random()  # not the global generator: retries must not shift a run's random draws


def retry(fn: Callable[..., Any], *args: Any, attempts: int = 10,
          transient: Callable[[BaseException], bool] = _is_busy, **kwargs: Any) -> Any:
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


def _probe_http(uri: str) -> None:
    """Fail fast if an HTTP tracking server does not answer (any HTTP status counts as an answer)."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"tracking URI {uri!r} cannot be reached ({reason}); start the MLflow server or fix "
                        "tracking.uri / MLFLOW_TRACKING_URI") from None


@contextmanager
def _fail_fast() -> Iterator[None]:
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


def check_uri(uri: str | None) -> str:
    """Checks that need no connection: a SQLite file's folder exists and is writable. Returns the URI."""
    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        parent = db.parent if str(db.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UserError(f"tracking URI {uri!r}: folder {str(parent)!r} does not exist or is not writable; "
                            "set tracking.uri or MLFLOW_TRACKING_URI to a writable location")
    return uri


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialize connecting to one SQLite file across processes: the first connection creates the
    tables (MLflow's migrations are not safe to run twice at once) and possibly the experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
        yield


def connect(uri: str | None, experiment: str) -> str:
    """Point MLflow at ``uri`` and select ``experiment``; fail *before* any training if unreachable."""
    _quiet_mlflow()
    import mlflow

    uri = check_uri(uri)
    if uri.startswith(("http://", "https://")):
        _probe_http(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with _fail_fast(), _first_use_lock(uri):
            retry(mlflow.set_experiment, experiment, transient=_is_race)
    except Exception as exc:  # unreachable server, bad scheme, deleted experiment, locked file...
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"tracking URI {uri!r} cannot be used ({msg}); start the server or fix tracking.uri / "
                        "MLFLOW_TRACKING_URI") from None
    return uri


def environment_tags() -> dict[str, str]:
    """Git commit of the prunebench checkout (when there is one) and package versions."""
    tags: dict[str, str] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in _PACKAGES:
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        tags["mlflow.source.git.commit"] = commit
        tags["prunebench.git_dirty"] = str(bool(dirty)).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


@contextmanager
def _run(run_id: str | None, nested: bool, run_name: str) -> Iterator[Any]:
    """Start (or reopen, with ``run_id``) a run and end it FINISHED, KILLED (interrupted: KeyboardInterrupt
    and subclasses) or FAILED (any other exception: error tags and a ``traceback.txt`` artifact first)."""
    import mlflow

    if run_id is None:
        run = retry(mlflow.start_run, run_name=run_name, nested=nested)
    else:
        run = retry(mlflow.start_run, run_id=run_id, nested=nested)
    try:
        yield run
    except KeyboardInterrupt:
        _end(run.info.run_id, "KILLED")
        raise
    except BaseException as exc:
        try:
            record_failure(exc)
        except Exception as log_exc:  # the original error matters more than the failed bookkeeping
            exc.add_note(f"(recording this failure in MLflow failed too: {type(log_exc).__name__}: {log_exc})")
        _end(run.info.run_id, "FAILED")
        raise
    else:
        _end(run.info.run_id, "FINISHED")


def _end(run_id: str, status: str) -> None:
    """End the active run; if the store is busy, set the status again until it sticks."""
    import mlflow

    try:
        mlflow.end_run(status)
    except Exception as exc:
        if not _is_busy(exc):
            raise
        retry(mlflow.MlflowClient().set_terminated, run_id, status)


def record_failure(exc: BaseException) -> None:
    """Tag the active run with the error (``prunebench.error``, ``prunebench.failure``) and log the traceback."""
    from prunebench.train import DivergedError

    kind = "diverged" if isinstance(exc, DivergedError) else "user-error" if isinstance(exc, UserError) else "error"
    set_tags({ERROR_TAG: f"{type(exc).__name__}: {exc}"[:4000], FAILURE_TAG: kind})
    log_text("".join(traceback.format_exception(exc)), "traceback.txt")


@contextmanager
def parent_run(recipe_name: str, run_name: str, recipe_yaml: str, *, recipe_key: str = "",
               run_id: str | None = None) -> Iterator[Any]:
    """The run that groups one invocation's cells; ``run_id`` reopens an earlier one (``--resume``)."""
    with _run(run_id, False, run_name) as run:
        if run_id is None:
            set_tags({KIND_TAG: "parent", RECIPE_TAG: recipe_name, RECIPE_KEY_TAG: recipe_key, **environment_tags()})
            log_text(recipe_yaml, "recipe.yaml")
        yield run


@contextmanager
def cell_run(run_name: str, params: Mapping[str, Any], recipe_name: str, *, cell_key: str = "",
             run_id: str | None = None, kind: str = "cell") -> Iterator[Any]:
    """A nested child run for one (method, seed, target) cell -- or, with ``kind="control"``, for a seed's
    dense control -- ``run_id`` reopens an unfinished one.

    Exceptions mark it FAILED (KILLED for an interrupt) and propagate.
    """
    import mlflow

    with _run(run_id, True, run_name) as run:
        if run_id is None:
            set_tags({KIND_TAG: kind, RECIPE_TAG: recipe_name, CELL_KEY_TAG: cell_key})
            retry(mlflow.log_params, {k: _param(v) for k, v in params.items()})
        else:  # a retried cell: the previous attempt's error no longer applies
            client = mlflow.MlflowClient()
            for tag in (ERROR_TAG, FAILURE_TAG):
                if tag in run.data.tags:
                    retry(client.delete_tag, run.info.run_id, tag)
        yield run


def find_parent(experiment: str, recipe_key: str) -> Any | None:
    """The latest parent run of ``experiment`` made from the same resolved recipe, or ``None``."""
    import mlflow

    exp = retry(mlflow.get_experiment_by_name, experiment)
    if exp is None:
        return None
    runs = retry(mlflow.MlflowClient().search_runs, [exp.experiment_id],
                 filter_string=f"tags.`{KIND_TAG}` = 'parent' and tags.`{RECIPE_KEY_TAG}` = '{recipe_key}'",
                 order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def cell_runs(parent: Any) -> dict[str, Any]:
    """The child runs of ``parent`` by cell key (a FINISHED one wins over other attempts, then the latest)."""
    import mlflow

    client = mlflow.MlflowClient()
    found: list[Any] = []
    token = None
    while True:
        page = retry(client.search_runs, [parent.info.experiment_id],
                     filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                     order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    by_key: dict[str, Any] = {}
    for run in found:
        key = run.data.tags.get(CELL_KEY_TAG)
        if key and (key not in by_key or by_key[key].info.status != "FINISHED"):
            by_key[key] = run
    return by_key


def _param(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def log_epoch(metrics: Mapping[str, float | None], step: int) -> None:
    import mlflow

    retry(mlflow.log_metrics, {k: float(v) for k, v in metrics.items() if v is not None and v == v}, step=step)


def log_final(metrics: Mapping[str, float | None], step: int = 0) -> None:
    """Final metrics of a cell; ``step`` is its last epoch (keeps per-epoch histories in order)."""
    import mlflow

    retry(mlflow.log_metrics, {k: float(v) for k, v in metrics.items() if v is not None}, step=max(step, 0))


def set_tags(tags: Mapping[str, str]) -> None:
    import mlflow

    retry(mlflow.set_tags, dict(tags))


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    retry(mlflow.log_text, text, artifact_file)


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    retry(mlflow.log_artifact, str(path), artifact_path)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """A list of flat dicts as CSV text (the per-layer table artifact)."""
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
