"""MLflow tracking with the names in design.md (other tools, e.g. ``prunebench compare``, read them).

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
Only rank 0 of a distributed job may call into this module (see design.md "Scale-out").
"""

from __future__ import annotations

import csv
import io
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prunebench.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
KIND_TAG = "prunebench.kind"
RECIPE_TAG = "prunebench.recipe"
STAGES_TAG = "prunebench.stage_epochs"

_PACKAGES = ("prunebench", "torch", "torchvision", "timm", "torch-pruning", "fvcore", "mlflow", "optuna", "pydantic")


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def resolve_uri(uri: str | None) -> str:
    """The recipe's URI, else ``$MLFLOW_TRACKING_URI``, else the SQLite default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def connect(uri: str | None, experiment: str) -> str:
    """Point MLflow at ``uri`` and select ``experiment``; fail *before* any training if unreachable."""
    _quiet_mlflow()
    import mlflow

    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        parent = db.parent if str(db.parent) else Path(".")
        if not parent.exists() or not os.access(parent, os.W_OK):
            raise UserError(f"tracking URI {uri!r}: folder {str(parent)!r} does not exist or is not writable; "
                            "set tracking.uri or MLFLOW_TRACKING_URI to a writable location")
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment)
    except Exception as exc:  # unreachable server, bad scheme, locked file...
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
def parent_run(recipe_name: str, run_name: str, recipe_yaml: str) -> Iterator[Any]:
    """The run that groups one invocation's cells."""
    import mlflow

    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({KIND_TAG: "parent", RECIPE_TAG: recipe_name, **environment_tags()})
        mlflow.log_text(recipe_yaml, "recipe.yaml")
        yield run


@contextmanager
def cell_run(run_name: str, params: Mapping[str, Any], recipe_name: str) -> Iterator[Any]:
    """A nested child run for one (method, seed, target) cell. Exceptions mark it FAILED and propagate."""
    import mlflow

    with mlflow.start_run(run_name=run_name, nested=True) as run:
        mlflow.set_tags({KIND_TAG: "cell", RECIPE_TAG: recipe_name})
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield run


def _param(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def log_epoch(metrics: Mapping[str, float | None], step: int) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and v == v}, step=step)


def log_final(metrics: Mapping[str, float | None]) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})


def set_tags(tags: Mapping[str, str]) -> None:
    import mlflow

    mlflow.set_tags(dict(tags))


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact_file)


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """A list of flat dicts as CSV text (the per-layer table artifact)."""
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
