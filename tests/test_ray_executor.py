"""``prunebench run --executor ray`` and ``prunebench tune --executor ray`` on a real local Ray instance (one per
module): the same metrics per cell as ``--executor local``, one parent run with every cell logged once, a worker
that dies fails only its cell, tune's workers sharing one study, and the exit-2 refusals (Ray missing, an
address that does not answer, Ray options without ``--executor ray``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunebench.cli import main

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray", reason="needs Ray: pip install 'prunebench[scale]'")

CRASH_PLUGIN = """
import os
from prunebench.method import PruningMethod
from prunebench.registry import register_method


@register_method("crash")
class Crash(PruningMethod):
    description = "test: the process dies while scoring channels"

    def score(self, group):
        os._exit(3)
"""


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module; ``run --executor ray`` joins it instead of starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def small_recipe(tiny_recipe: dict) -> dict:
    tiny_recipe["methods"] = [{"name": "l1"}, {"name": "random"}]
    tiny_recipe["measure"] = {"onnx": False, "repeats": 1, "warmup": 0, "latency_batch": 8}
    tiny_recipe["dense_control"] = False
    return tiny_recipe


def _cells(uri: str) -> tuple[list, list]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    found = client.search_runs([exp.experiment_id])
    parents = [r for r in found if r.data.tags.get("prunebench.kind") == "parent"]
    return parents, [r for r in found if r.data.tags.get("prunebench.kind") == "cell"]


def _figures(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if "latency" not in k and "speedup" not in k}


def test_ray_grid_equals_local(ray_instance, write_recipe, small_recipe, tmp_path, one_thread) -> None:
    """Each executor from a fresh dense cache: Ray trains the dense model in a task, then runs each cell in a
    worker with one torch thread (its one CPU); the local loop runs here with one thread too."""
    by_executor = {}
    for executor in ("local", "ray"):
        small_recipe["workdir"] = str(tmp_path / f"work-{executor}")
        uri = f"sqlite:///{tmp_path}/{executor}.db"
        small_recipe["tracking"] = {"uri": uri}
        path = write_recipe(small_recipe, f"{executor}.yaml")
        assert main(["run", str(path), "-q", "--executor", executor]) == 0
        parents, cells = _cells(uri)
        assert len(parents) == 1
        assert sorted(c.data.params["method_label"] for c in cells) == ["l1", "random"]  # every cell once
        for cell in cells:
            assert cell.info.status == "FINISHED"
            assert cell.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert parents[0].info.status == "FINISHED"
        by_executor[executor] = {c.data.params["method_label"]: _figures(c) for c in cells}
    assert by_executor["ray"] == by_executor["local"]
    assert {"test_top1", "val_top1", "macs", "train_loss"} <= set(by_executor["ray"]["l1"])
    assert torch.get_num_threads() == 1  # the driver's own threads were left alone


def test_tune_workers_share_each_study_as_ray_tasks(ray_instance, write_recipe, small_recipe, tmp_path) -> None:
    import mlflow
    import optuna

    space = {"tune": [1.0e-6, 1.0e-3], "log": True}
    small_recipe["methods"] = [{"name": "oicsr", "lambda": dict(space)}, {"name": "group_lasso", "lambda": space}]
    small_recipe["tune"] = {"sparsity_epochs": 1, "finetune_epochs": 1}
    small_recipe["data"]["num_samples"] = 384  # trials of about a second: both workers are in before the total
    path = write_recipe(small_recipe)
    total = 5
    argv = ["tune", str(path), "-q", "--executor", "ray", "--workers", "2", "--trials", str(total)]
    assert main(argv) == 0

    workers = set()
    for name in ("tiny-oicsr", "tiny-group_lasso"):
        trials = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db").get_trials()
        # each worker checks the count before it starts a trial: at most one over per extra worker
        assert total <= len(trials) <= total + 1, [t.number for t in trials]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
        assert len({t.params["lambda"] for t in trials}) == len(trials)  # the workers drew different values
        workers |= {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert len(workers) == 2 and str(os.getpid()) not in workers  # both Ray workers ran trials, the driver none

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    studies = client.search_runs([exp.experiment_id], "tags.`prunebench.kind` = 'study'")
    assert len(studies) == 4  # a study run per worker and study, as separate processes would open
    for run in studies:
        assert run.info.status == "FINISHED"
        assert "r.tuned.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "lambda:" in (tmp_path / "r.tuned.yaml").read_text()


CRASH_ONCE_PLUGIN = """
import os
from pathlib import Path

from prunebench.methods.oicsr import OICSR
from prunebench.registry import register_method


MARKER = {marker!r}


@register_method("oicsr_crash_once")
class CrashOnce(OICSR):
    description = "test: OICSR whose first trial's process dies at its first epoch end"

    def on_epoch_end(self, epoch):
        marker = Path(MARKER)
        if not marker.exists():
            marker.touch()
            os._exit(3)
        super().on_epoch_end(epoch)
"""


def test_a_dead_tune_worker_leaves_the_others_going(ray_instance, write_recipe, small_recipe, tmp_path, caplog) -> None:
    import optuna

    (tmp_path / "crash.py").write_text(CRASH_ONCE_PLUGIN.format(marker=str(tmp_path / "crashed")))
    small_recipe["plugins"] = ["crash.py"]
    small_recipe["methods"] = [{"name": "oicsr_crash_once", "lambda": {"tune": [1.0e-6, 1.0e-3], "log": True}}]
    small_recipe["tune"] = {"sparsity_epochs": 1, "finetune_epochs": 1}
    path = write_recipe(small_recipe)
    assert main(["tune", str(path), "-q", "--executor", "ray", "--workers", "2", "--trials", "3"]) == 0
    assert (tmp_path / "crashed").exists()
    assert "a tune worker was lost" in caplog.text
    trials = optuna.load_study(study_name="tiny-oicsr_crash_once", storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [t.state.name for t in trials.get_trials()]
    assert states.count("COMPLETE") >= 2, states  # the other worker went on to the total
    assert (tmp_path / "r.tuned.yaml").exists()


def test_a_dead_worker_fails_only_its_cell(ray_instance, write_recipe, small_recipe, tmp_path, capsys) -> None:
    (tmp_path / "crash.py").write_text(CRASH_PLUGIN)
    small_recipe["plugins"] = ["crash.py"]
    small_recipe["methods"] = [{"name": "crash"}, {"name": "l1"}]
    path = str(write_recipe(small_recipe))
    assert main(["run", path, "-q", "--executor", "ray"]) == 1
    parents, cells = _cells(f"sqlite:///{Path.cwd()}/mlflow.db")
    status = {c.data.params["method_label"]: c for c in cells}
    assert status["l1"].info.status == "FINISHED"
    assert status["crash"].info.status == "FAILED"  # left RUNNING by the dead worker, ended by the driver
    assert "died" in status["crash"].data.tags["prunebench.error"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "--executor ray --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],  # one path; SIGINT: make test-slow
)
def test_a_signal_kills_the_ray_grid_and_resume_finishes_it(write_recipe, small_recipe, tmp_path, sig) -> None:
    """Ctrl-C (or SIGTERM) while a cell runs as a Ray task: exit 130 (143), the resume command, the running
    cells KILLED; ``--resume`` then finishes them from their checkpoints, no epoch lost or repeated.
    Ray turns the handler's exception into a plain KeyboardInterrupt and replaces the SIGTERM handler:
    ``raytasks.session`` gives prunebench its own handling back."""
    small_recipe["sparsity"] = {"epochs": 20, "lr": 0.01}  # long enough to be stopped in the middle
    small_recipe["data"]["num_samples"] = 800
    small_recipe["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}
    path = write_recipe(small_recipe)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "prunebench", "run", str(path), "-q", "--executor", "ray"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    checkpoints = tmp_path / ".prunebench" / "checkpoints"  # the store is left alone until the signal
    while not list(checkpoints.glob("*/last.pt")):  # a cell past its first epoch
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "--executor ray --resume" in err, err
    parents, cells = _cells(f"sqlite:///{tmp_path}/mlflow.db")
    assert [p.info.status for p in parents] == ["KILLED"]
    # the running cells end KILLED; a cell whose task had not started has no run, one may finish meanwhile
    statuses = [c.info.status for c in cells]
    assert "KILLED" in statuses and set(statuses) <= {"KILLED", "FINISHED"}, statuses

    assert subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True).returncode == 0
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parents, cells = _cells(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(cells) == 2 and all(c.info.status == "FINISHED" for c in cells)  # the same runs, reopened
    for cell in cells:
        steps = [m.step for m in client.get_metric_history(cell.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(21)), steps  # 20 sparsity epochs and 1 fine-tuning epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "command,hide_ray,args,needle",
    [
        ("run", False, ["--executor", "ray", "--address", f"127.0.0.1:{_free_port()}"], "no Ray cluster answers"),
        ("run", True, ["--executor", "ray"], "pip install 'prunebench[scale]'"),
        ("run", False, ["--address", "127.0.0.1:1"], "add --executor ray"),
        ("tune", False, ["--executor", "ray", "--address", f"127.0.0.1:{_free_port()}"], "no Ray cluster answers"),
        ("tune", True, ["--executor", "ray", "--workers", "2"], "pip install 'prunebench[scale]'"),
        ("tune", False, ["--workers", "2"], "add --executor ray"),
        ("tune", False, ["--executor", "ray", "--workers", "0"], "--workers 0"),
    ],
)
def test_ray_refusals_exit_2_in_seconds(
    write_recipe, small_recipe, command, hide_ray, args, needle, monkeypatch, capsys
) -> None:
    small_recipe["methods"] = [{"name": "oicsr", "lambda": {"tune": [1.0e-6, 1.0e-3], "log": True}}]
    if command == "run":
        small_recipe["methods"] = [{"name": "l1"}]
    path = str(write_recipe(small_recipe))
    if hide_ray:
        monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without Ray
    t0 = time.monotonic()
    assert main([command, path, *args]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - t0 < 30
    assert not Path("mlflow.db").exists() and not Path("optuna.db").exists()  # refused before any run
