"""Real servers, no mocks: two ``prunebench tune`` workers share one Optuna study on PostgreSQL, and a grid run
as Ray tasks, logged to an ``mlflow server`` backed by PostgreSQL, comes back through ``prunebench compare``
over HTTP.
A PostgreSQL URL whose driver is missing is refused in one line naming what to install, before any work.

The PostgreSQL server is a throw-away one (tests/pgserver.py); without the server binaries these tests skip
with the command that installs them (.ci/run installs them in CI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgserver import PgServer, free_port, pg_server  # noqa: F401  (pg_server is a fixture)
from prunebench.cli import main

FAST_MEASURE = {"onnx": False, "repeats": 1, "warmup": 0, "latency_batch": 8}
SPACE = {"tune": [1.0e-6, 1.0e-3], "log": True}


@pytest.fixture
def fast_recipe(tiny_recipe: dict) -> dict:
    tiny_recipe["measure"] = dict(FAST_MEASURE)
    return tiny_recipe


@pytest.fixture(scope="module")
def mlflow_server(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    """``mlflow server`` on a PostgreSQL backend store with its own artifact folder; yields its http:// URI."""
    backend = pg_server.create("mlflow")
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_cli),
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        str(folder / "artifacts"),
    ]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n{(folder / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in 180 s:\n{(folder / 'server.log').read_text()}")
            time.sleep(0.5)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own group: mlflow and the uvicorn it starts
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_two_tune_workers_share_one_study_on_postgresql(pg_server: PgServer, write_recipe, fast_recipe, side_by_side):  # noqa: F811
    import optuna
    from optuna.trial import TrialState

    storage = pg_server.create("optuna_workers")
    fast_recipe["methods"] = [{"name": "oicsr", "lambda": dict(SPACE)}]
    fast_recipe["tune"] = {"sparsity_epochs": 1, "finetune_epochs": 1}
    fast_recipe["data"]["num_samples"] = 384  # trials of about a second: both workers are in before the total
    path = write_recipe(fast_recipe)
    total = 4
    finished = side_by_side(["tune", str(path), "--trials", str(total), "--storage", storage])
    for p, out in finished:
        assert p.returncode == 0, out
        assert "Traceback" not in out, out

    study = optuna.load_study(study_name="tiny-oicsr", storage=storage)
    trials = study.get_trials()
    n = len(trials)
    # each worker checks the count before it starts a trial: when both start the last one at the same
    # instant the study ends one over (prunebench/commands/tune/study.py); never short, never two over
    assert total <= n <= total + 1, [t.number for t in trials]
    assert sorted(t.number for t in trials) == list(range(n))
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    workers = [t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials]  # host:pid of the process that ran it
    assert set(workers) == {str(p.pid) for p, _ in finished}, workers  # both workers ran trials
    assert len({t.params["lambda"] for t in trials}) == n  # the workers drew different values


def test_ray_grid_logged_to_an_mlflow_server_on_postgresql_is_compared_over_http(
    mlflow_server: str, write_recipe, fast_recipe, tmp_path: Path, capsys
) -> None:
    fast_recipe["name"] = "pgserver"
    fast_recipe["methods"] = [{"name": "l1"}, {"name": "random"}]
    fast_recipe["tracking"] = {"uri": mlflow_server}
    path = write_recipe(fast_recipe)
    assert main(["run", str(path), "-q", "--executor", "ray"]) == 0  # each cell logs from its own Ray worker
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # all went to the server
    capsys.readouterr()

    out = tmp_path / "report"
    assert main(["compare", "--tracking-uri", mlflow_server, "--experiment", "pgserver", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "table.json").read_text())
    assert {r["method_label"] for r in doc["rows"]} >= {"l1", "random"}, doc["rows"]
    assert {c["method_label"] for c in doc["cells"]} == {"l1", "random"}
    assert all(m in printed for m in ("l1", "random")), printed
    # the cells' artifacts (layers.csv, read for the layers plot) came back through the server
    assert not any("layers.csv" in n for n in doc["notes"]), doc["notes"]
    assert (out / "layers.png").stat().st_size > 0 and (out / "tradeoff.png").stat().st_size > 0


@pytest.mark.parametrize("command", ["tune", "run", "compare"])
def test_a_postgresql_url_without_its_driver_names_the_extra(command, write_recipe, fast_recipe, tmp_path, capsys):
    """``postgresql+pg8000://``: a real dialect whose driver is not installed; refused before any training."""
    url = f"postgresql+pg8000://postgres:secret@127.0.0.1:{free_port()}/x"
    fast_recipe["methods"] = [{"name": "oicsr", "lambda": dict(SPACE)}]
    if command == "tune":
        argv = ["tune", str(write_recipe(fast_recipe)), "--trials", "1", "--storage", url]
    elif command == "run":
        fast_recipe["tracking"] = {"uri": url}
        fast_recipe["methods"] = [{"name": "l1"}]
        argv = ["run", str(write_recipe(fast_recipe))]
    else:
        argv = ["compare", "--tracking-uri", url, "--experiment", "tiny"]
    assert "pg8000" not in sys.modules
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "'pg8000'" in err and "pip install 'prunebench[scale]'" in err and "secret" not in err, err
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.safetensors"))  # nothing trained
