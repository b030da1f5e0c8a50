"""Reliability (issue 7): resume after SIGKILL / SIGINT / SIGTERM ends with the metrics of an uninterrupted
run, failures stay in their cell, bad input is refused before anything is created, loading is safe,
and two runs can share one tracking store and dense cache.

The interrupted runs are real ``prunebench run`` subprocesses (one thread each); the reference and the
resumed runs run in-process, also on one thread, so all of them compute the same floating-point sums.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TINY_RECIPE
from prunebench.cache import TrainingCheckpoint
from prunebench.cli import main
from prunebench.files import load_torch

# Long enough epochs (6 steps) that a signal sent right after a checkpoint lands inside the next epoch.
RESUME_RECIPE: dict = {
    "name": "resume",
    "data": {
        "name": "synthetic",
        "num_samples": 256,
        "image_size": 16,
        "num_classes": 4,
        "val_split": 0.25,
        "batch_size": 32,
        "eval_batch_size": 128,
    },
    "model": {"name": "resnet8_cifar"},
    "dense": {"epochs": 2, "lr": 0.05},
    "sparsity": {"epochs": 2, "lr": 0.02},
    "methods": [{"name": "random"}],  # its pruning draws from the global RNG: resume must restore it
    "prune": {"target": 0.4, "scope": "internal"},
    "finetune": {"epochs": 2, "lr": 0.01},
    "seeds": [3],
    "measure": {"latency_batch": 4, "warmup": 0, "repeats": 1},
    "dense_control": False,  # one cell to kill and resume (a control resumes through the same checkpoints)
}
TIMED = ("latency", "speedup")  # metrics with these in their names are timings: they differ from run to run
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
    "MLFLOW_TRACKING_URI": "",
}


# -- helpers --------------------------------------------------------------------------------------------


def _recipe_in(folder: Path, base: dict, **changes) -> Path:
    """A recipe file in ``folder`` with its own workdir and SQLite store (absolute paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = copy.deepcopy(base)
    recipe.update(workdir=str(folder / "work"), tracking={"uri": f"sqlite:///{folder / 'mlflow.db'}"}, **changes)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _runs(folder: Path, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if r.data.tags.get("prunebench.kind") == "parent"]
    cells = [r for r in runs if r.data.tags.get("prunebench.kind") == "cell"]
    return client, parents, cells


def _final(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if not any(word in k for word in TIMED)}


def _history(client, run_id: str, key: str = "train_loss") -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _in_process(argv: list[str]) -> int:
    """``prunebench`` in this process on one thread, like the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _start(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prunebench", "run", str(recipe), *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=recipe.parent,
    )


def _wait_for_checkpoint(
    proc: subprocess.Popen, workdir: Path, ok: Callable[[TrainingCheckpoint], bool], timeout: float = 240
) -> TrainingCheckpoint:
    """Poll the workdir until a checkpoint satisfying ``ok`` exists (files appear atomically)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in [*workdir.glob("dense/*.partial.pt"), *workdir.glob("checkpoints/*/last.pt")]:
            try:
                ck = TrainingCheckpoint.read(path)
            except (FileNotFoundError, EOFError, RuntimeError):  # cleared between glob and read
                continue
            if ck is not None and ok(ck):
                return ck
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the checkpoint:\n{out}\n{err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no checkpoint in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run every resumed run must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    assert _in_process(["run", str(_recipe_in(folder, RESUME_RECIPE)), "-q"]) == 0
    client, _, cells = _runs(folder, "resume")
    (cell,) = cells
    return {"final": _final(cell), "history": _history(client, cell.info.run_id)}


def _assert_resumed_like_reference(folder: Path, reference: dict, killed_run: str | None) -> None:
    client, parents, cells = _runs(folder, "resume")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the parent run was reopened, not new
    (cell,) = cells
    assert cell.info.status == "FINISHED"
    if killed_run is not None:
        assert cell.info.run_id == killed_run  # continued in the same MLflow run
    assert _final(cell) == reference["final"]
    assert _history(client, cell.info.run_id) == reference["history"]  # every epoch logged, same values
    assert not list((folder / "work" / "checkpoints").glob("*/last.pt"))  # cleared once finished


# -- resume ---------------------------------------------------------------------------------------------


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, reference, capsys) -> None:
    recipe = _recipe_in(tmp_path / "killed", RESUME_RECIPE)
    proc = _start(recipe, "-q")
    ck = _wait_for_checkpoint(proc, tmp_path / "killed" / "work", lambda c: c.kind == "cell" and c.stage == "sparsity")
    proc.send_signal(signal.SIGKILL)  # mid sparsity epoch 2: no handler runs, nothing is marked
    proc.communicate()
    assert (ck.epoch, proc.returncode) == (0, -signal.SIGKILL)
    client, _, cells = _runs(tmp_path / "killed", "resume")
    assert [c.info.status for c in cells] == ["RUNNING"]
    assert list(_history(client, cells[0].info.run_id)) == [0]  # killed before sparsity epoch 2 ended

    assert _in_process(["run", str(recipe), "--resume"]) == 0
    assert "resuming from its checkpoint after sparsity epoch 1" in capsys.readouterr().out
    _assert_resumed_like_reference(tmp_path / "killed", reference, ck.run_id)


def test_sigint_marks_killed_exits_130_and_resumes(tmp_path, reference, capsys) -> None:
    recipe = _recipe_in(tmp_path / "int", RESUME_RECIPE)
    proc = _start(recipe, "-q")
    ck = _wait_for_checkpoint(proc, tmp_path / "int" / "work", lambda c: c.kind == "cell" and c.stage == "finetune")
    proc.send_signal(signal.SIGINT)  # mid fine-tuning epoch 2: the pruned model and momentum must be restored
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"prunebench run {recipe} -q --resume" in err and "Traceback" not in err
    _, parents, cells = _runs(tmp_path / "int", "resume")
    assert [p.info.status for p in parents] == ["KILLED"] and [c.info.status for c in cells] == ["KILLED"]

    assert _in_process(["run", str(recipe), "-q", "--resume"]) == 0
    _assert_resumed_like_reference(tmp_path / "int", reference, ck.run_id)


def test_sigterm_during_dense_training_exits_143_and_resumes(tmp_path, reference, capsys) -> None:
    recipe = _recipe_in(tmp_path / "term", RESUME_RECIPE)
    proc = _start(recipe, "-q")
    _wait_for_checkpoint(proc, tmp_path / "term" / "work", lambda c: c.kind == "dense")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "--resume" in err
    _, parents, cells = _runs(tmp_path / "term", "resume")
    assert [p.info.status for p in parents] == ["KILLED"] and not cells

    assert _in_process(["run", str(recipe), "--resume"]) == 0
    assert "resuming the dense model from its checkpoint after dense epoch 1" in capsys.readouterr().out
    _assert_resumed_like_reference(tmp_path / "term", reference, None)


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    "method,stop_at", [("random", ("sparsity", 1)), ("thinet", ("between", 2)), ("oicsr", ("finetune", 3))]
)
def test_cell_resumes_from_any_stage_of_iterative_pruning(method, stop_at, tmp_path) -> None:
    """In-process: a cell stopped in any stage (iterative pruning: sparsity, prune, between, prune,
    fine-tune) and resumed from its checkpoint ends with the uninterrupted cell's exact weights."""
    from prunebench.cache import cell_checkpoint_path
    from prunebench.commands.run import CellCheckpoints, Context, dense_model, train_and_prune
    from prunebench.measure import count_macs
    from prunebench.registry import load_recipe

    recipe = load_recipe(
        _recipe_in(
            tmp_path,
            TINY_RECIPE,
            sparsity={"epochs": 2, "lr": 0.01},
            prune={"target": 0.4, "scope": "internal", "iterations": 2, "epochs_between": 1, "calib_images": 32},
        )
    )
    ctx = Context(recipe, quiet=True)
    dense = dense_model(ctx, 0)
    macs = count_macs(dense, ctx.example).macs
    spec = {"name": method}

    def cell(run_id: str, on_epoch=None):
        ckpts = CellCheckpoints(cell_checkpoint_path(recipe, run_id), "key", run_id)
        return train_and_prune(ctx, dense, macs, spec, 0, 0.4, on_epoch, checkpoints=ckpts), ckpts

    (expected, stages), _ = cell("straight")

    def stop(stage: str, _stats, step: int) -> None:
        if (stage, step) == stop_at:
            raise _Stop

    with pytest.raises(_Stop):
        cell("stopped", stop)
    (model, resumed_stages), ckpts = cell("stopped")  # continues from the checkpoint before ``stop_at``
    assert ckpts.latest() is not None and resumed_stages == stages == {
        "sparsity": [0, 2],
        "between": [2, 3],
        "finetune": [3, 4],
    }
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


# -- failure isolation ------------------------------------------------------------------------------------

FAILING_PLUGIN = """
import torch
from prunebench import PruningMethod, register_method

@register_method("explodes")
class Explodes(PruningMethod):
    description = "test: an infinite penalty (divergence)"
    def penalty(self):
        return torch.tensor(float("inf"))
    def score(self, group):
        return torch.ones(group.size)

@register_method("raises")
class Raises(PruningMethod):
    description = "test: scoring raises"
    def score(self, group):
        raise RuntimeError("score exploded on purpose")
"""


def test_failing_cells_are_isolated(tmp_path) -> None:
    """Divergence, an exception and a broken installed plugin fail their own cells; the control finishes."""
    (tmp_path / "failing.py").write_text(FAILING_PLUGIN)
    (tmp_path / "unnamed.py").write_text("open('plugin-ran', 'w').close()\n")  # never named: must not run
    site = tmp_path / "site"  # an installed distribution whose entry point fails to import
    (site / "broken_pb_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "broken_pb_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-pb-plugin\nVersion: 0.1\n"
    )
    (site / "broken_pb_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[prunebench.methods]\nbroken_ep = broken_pb_plugin:Method\n"
    )
    (site / "broken_pb_plugin.py").write_text("import a_module_that_is_not_installed\n")
    methods = [{"name": "l1"}, {"name": "explodes"}, {"name": "raises"}, {"name": "broken_ep"}]
    recipe = _recipe_in(tmp_path, TINY_RECIPE, plugins=[str(tmp_path / "failing.py")], methods=methods)
    proc = subprocess.run(
        [sys.executable, "-m", "prunebench", "run", str(recipe), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**ENV, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 1, proc.stderr
    assert "3 of 4 cells failed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "plugin-ran").exists()

    client, parents, cells = _runs(tmp_path, "tiny")
    by_method = {c.data.params["method"]: c for c in cells}
    assert by_method["l1"].info.status == "FINISHED" and parents[0].info.status == "FINISHED"
    expected = {
        "explodes": ("diverged", "loss became"),
        "raises": ("error", "score exploded on purpose"),
        "broken_ep": ("user-error", "a_module_that_is_not_installed"),
    }
    for name, (kind, needle) in expected.items():
        run = by_method[name]
        assert run.info.status == "FAILED", name
        assert run.data.tags["prunebench.failure"] == kind and needle in run.data.tags["prunebench.error"], name
        trace = Path(client.download_artifacts(run.info.run_id, "traceback.txt", str(tmp_path / name))).read_text()
        assert "Traceback" in trace and needle in trace, name
        assert needle in proc.stderr


# -- bad input catalogue ------------------------------------------------------------------------------------


def _merge(recipe: dict, patch: dict) -> dict:
    for k, v in patch.items():
        recipe[k] = {**recipe[k], **v} if isinstance(v, dict) and isinstance(recipe.get(k), dict) else v
    return recipe


def _bad_checkpoint(tmp: Path) -> str:
    torch.save({"conv.weight": torch.zeros(3)}, tmp / "other.pt")
    return str(tmp / "other.pt")


def _incomplete_cifar(tmp: Path) -> str:
    (tmp / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp / "cifar" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    return str(tmp / "cifar")


def _empty_plugin(tmp: Path) -> str:
    (tmp / "empty.py").write_text("x = 1\n")
    return str(tmp / "empty.py")


def _file_in_the_way(tmp: Path) -> str:
    (tmp / "a_file").write_text("")
    return str(tmp / "a_file" / "work")


# (recipe text, or a patch of TINY_RECIPE, or a callable(tmp) -> patch; extra CLI args; stderr pattern)
CATALOGUE = [
    ("yaml-syntax", "name: [unclosed\n", [], r"r\.yaml:\d+:\d+: YAML syntax error"),
    ("empty-file", "", [], "the recipe is empty"),
    ("list-not-mapping", "- name: a\n- name: b\n", [], "must be a mapping"),
    ("unknown-key", {"finetun": {"epochs": 1}}, [], r"finetun: unknown key\. Did you mean 'finetune'"),
    ("wrong-type", {"dense": {"epochs": "many"}}, [], r"dense\.epochs: .*integer"),
    ("target-zero", {"prune": {"target": 0}}, [], r"prune\.target: .*strictly between 0 and 1"),
    ("target-one", {"prune": {"target": 1.0}}, [], r"prune\.target: .*strictly between 0 and 1"),
    (
        "negative-lambda",
        {"methods": [{"name": "oicsr", "lambda": -1e-4}]},
        [],
        r"methods\[0\]\.lambda: .*greater than or equal to 0",
    ),
    ("negative-lr", {"finetune": {"epochs": 1, "lr": -0.1}}, [], r"finetune\.lr: .*greater than 0"),
    ("zero-dense-epochs", {"dense": {"epochs": 0}}, [], r"dense\.epochs must be at least 1 unless"),
    ("max-layer-ratio-0", {"prune": {"max_layer_ratio": 0}}, [], r"prune\.max_layer_ratio: .*greater than 0"),
    (
        "max-layer-ratio-big",
        {"prune": {"max_layer_ratio": 1.2}},
        [],
        r"prune\.max_layer_ratio: .*less than or equal to 1",
    ),
    ("extends-cycle", "extends: r.yaml\nname: loop\n", [], r"'extends' cycle"),
    ("extends-missing", "extends: nowhere.yaml\nname: orphan\n", [], r"parent recipe 'nowhere.yaml' not found"),
    ("override-syntax", {}, ["-o", "finetune.epochs"], r"expected KEY=VALUE"),
    ("override-unknown-key", {}, ["-o", "finetune.epokhs=2"], r"finetune\.epokhs: unknown key\. Did you mean 'epochs'"),
    (
        "unknown-method",
        {"methods": [{"name": "slimmming"}]},
        [],
        r"unknown method 'slimmming'\. Did you mean 'slimming'",
    ),
    (
        "unknown-model",
        {"model": {"name": "resnet8_cifra"}},
        [],
        r"unknown model 'resnet8_cifra'\. Did you mean 'resnet8_cifar'",
    ),
    ("unknown-dataset", {"data": {"name": "cifar11"}}, [], r"data\.name: .*'cifar10'"),
    ("plugin-missing", {"plugins": ["nope.py"]}, [], r"plugin file 'nope.py' does not exist"),
    ("plugin-registers-nothing", lambda t: {"plugins": [_empty_plugin(t)]}, [], r"registers no method"),
    (
        "dataset-missing",
        {"data": {"name": "cifar10", "root": "nowhere", "download": False}},
        [],
        r"CIFAR-10 not found at .*nowhere.*data\.download: true",
    ),
    (
        "dataset-incomplete",
        lambda t: {"data": {"name": "cifar10", "root": _incomplete_cifar(t)}},
        [],
        r"CIFAR-10 incomplete \(data_batch_2.* missing\)",
    ),
    (
        "checkpoint-missing",
        {"dense": {"checkpoint": "no_such.pt"}},
        [],
        r"dense\.checkpoint 'no_such.pt' does not exist",
    ),
    (
        "checkpoint-mismatch",
        lambda t: {"dense": {"checkpoint": _bad_checkpoint(t)}},
        [],
        r"dense\.checkpoint .*other\.pt' does not match model 'resnet8_cifar'",
    ),
    (
        "tracking-unreachable",
        {"tracking": {"uri": "http://127.0.0.1:9"}},
        [],
        r"tracking URI 'http://127\.0\.0\.1:9' cannot be reached",
    ),
    (
        "workdir-unwritable",
        lambda t: {"workdir": _file_in_the_way(t)},
        [],
        r"workdir .* cannot be created: .*a_file' is a file",
    ),
]


@pytest.mark.parametrize("content,args,pattern", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input_catalogue(content, args, pattern, tmp_path, capsys) -> None:
    """One line on stderr, exit 2, no traceback, no MLflow store or run, no workdir or checkpoint."""
    if callable(content):
        content = content(tmp_path)
    if isinstance(content, dict):
        content = yaml.safe_dump(_merge(copy.deepcopy(TINY_RECIPE), content), sort_keys=False)
    (tmp_path / "r.yaml").write_text(content)
    started = time.monotonic()
    assert main(["run", str(tmp_path / "r.yaml"), "-q", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(pattern, err), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".prunebench").exists()
    assert time.monotonic() - started < 30  # refused up front, not after training


# -- safe loading ----------------------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch code-ran",))


def test_checkpoints_never_execute_code(tmp_path, write_recipe, tiny_recipe, capsys) -> None:
    torch.save({"state_dict": _Payload()}, tmp_path / "evil.pt")
    tiny_recipe["dense"] = {"epochs": 1, "checkpoint": str(tmp_path / "evil.pt")}
    assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 2
    assert "cannot be read as a weights-only state dict" in capsys.readouterr().err
    assert not (tmp_path / "code-ran").exists()


def test_a_corrupt_cached_dense_model_is_moved_aside_and_trained_again(tmp_path, capsys) -> None:
    """A truncated dense cache file (a crash of an older version, a full disk) does not stop later runs:
    it is named in one warning, moved aside as ``<name>.corrupt`` and the dense model is trained again."""
    recipe = _recipe_in(tmp_path, TINY_RECIPE)
    assert main(["run", str(recipe), "-q"]) == 0
    (cached,) = [p for p in (tmp_path / "work" / "dense").glob("*.pt") if not p.name.endswith(".partial.pt")]
    data = cached.read_bytes()
    cached.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    out, err = capsys.readouterr()
    aside = cached.with_name(cached.name + ".corrupt")
    assert aside.is_file() and aside.stat().st_size == len(data) // 2
    assert str(cached) in err and "cannot be read" in err and "Traceback" not in err, err
    assert "training the dense model" in out and "dense model from cache" not in out, out
    assert "state_dict" in load_torch(cached)  # a new, complete file under the cache's name
    _, parents, cells = _runs(tmp_path, "tiny")
    assert sorted(r.info.status for r in parents + cells) == ["FINISHED"] * 4  # a parent and a cell per invocation


def test_a_truncated_user_checkpoint_exits_2_naming_it(tmp_path, write_recipe, tiny_recipe, capsys) -> None:
    """The user's dense.checkpoint, unlike a cached file, is never moved aside: one line naming it, exit 2."""
    from prunebench.models import create_model
    from prunebench.recipe import ModelConfig

    path = tmp_path / "dense.pt"
    torch.save(create_model(ModelConfig(name="resnet8_cifar"), num_classes=4, in_chans=3).state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    tiny_recipe["dense"] = {"epochs": 1, "checkpoint": str(path)}
    assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"dense.checkpoint {str(path)!r} cannot be read" in err, err
    assert path.stat().st_size == 1000 and not path.with_name("dense.pt.corrupt").exists()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".prunebench").exists()


def test_every_torch_load_is_weights_only() -> None:
    """A static check over the package and the built-in methods (the loaders of user files)."""
    offenders = []
    for path in [*(ROOT / "prunebench").rglob("*.py"), *(ROOT / "methods").rglob("*.py")]:
        for m in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", path.read_text()):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{path.name}: {m.group(0)}")
        if re.search(r"yaml\.(unsafe_load|full_load|load\((?![^)]*Loader=_RecipeLoader))", path.read_text()):
            offenders.append(f"{path.name}: yaml loader")
    assert not offenders


# -- building blocks --------------------------------------------------------------------------------------------


def test_signals_are_held_during_a_checkpoint_write(tmp_path) -> None:
    from prunebench.files import atomic_save
    from prunebench.signals import signals_held

    got = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert got == []  # held back ...
            atomic_save({"x": torch.ones(2)}, tmp_path / "a.pt")
        assert got == [signal.SIGTERM]  # ... and delivered after the block
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left


@pytest.mark.unit
def test_a_plain_keyboard_interrupt_becomes_the_signal_received() -> None:
    """Ray raises a plain KeyboardInterrupt out of its waits in place of the handler's Interrupted: the
    signal that arrived (SIGTERM here, exit 143) is still the one the command reports."""
    from prunebench.signals import Interrupted, as_interrupted, handle_signals

    with handle_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
            pytest.fail("SIGTERM was not turned into Interrupted")
        except Interrupted as exc:
            assert exc.signum == signal.SIGTERM
    plain = as_interrupted(KeyboardInterrupt())  # what the library raised instead of the handler's exception
    assert plain.signum == signal.SIGTERM and plain.exit_code == 143
    own = Interrupted(signal.SIGINT)
    assert as_interrupted(own) is own


def test_tracking_retries_a_locked_database() -> None:
    from sqlalchemy.exc import OperationalError

    from prunebench.tracking.store import retry

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))
        return "ok"

    assert retry(flaky) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        retry(lambda: (_ for _ in ()).throw(ValueError("not a lock problem")))


# -- concurrency ---------------------------------------------------------------------------------------------


def test_two_runs_share_one_store_and_dense_cache(tmp_path) -> None:
    # dense training long enough (10 x 12 steps) that the second process arrives while the first trains
    recipe = _recipe_in(
        tmp_path, TINY_RECIPE, data={**TINY_RECIPE["data"], "num_samples": 512}, dense={"epochs": 10, "lr": 0.05}
    )
    procs = [_start(recipe) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("training the dense model") == 1, stdout  # trained once ...
    assert stdout.count("another process is training this dense model; waiting") == 1, stdout  # ... the other waits
    assert stdout.count("dense model from cache") == 1, stdout  # ... and reuses it
    _, parents, cells = _runs(tmp_path, "tiny")
    assert sorted(r.info.status for r in parents + cells) == ["FINISHED"] * 4
    assert _final(cells[0]) == _final(cells[1])  # same seed, same dense start: same cell
