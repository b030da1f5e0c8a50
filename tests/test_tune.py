"""``prunebench tune``: studies on tiny recipes -- storage, resume, parallel workers, MLflow layout, the tuned
recipe, divergence, and that the test split is never read."""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import ROOT
from prunebench.cli import main
from prunebench.recipe import TuneConfig
from prunebench.registry import load_recipe

SPACE = {"tune": [1.0e-6, 1.0e-3], "log": True}


@pytest.fixture
def tune_recipe(tiny_recipe: dict) -> dict:
    """The tiny recipe with an inline search space for oicsr, a control without parameters and a tune: section."""
    tiny_recipe["methods"] = [{"name": "oicsr", "lambda": dict(SPACE)}, {"name": "l1"}]
    tiny_recipe["tune"] = {"sparsity_epochs": 1, "finetune_epochs": 1}
    return tiny_recipe


def _study(name: str = "tiny-oicsr", storage: str = "sqlite:///optuna.db") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def _runs(kind: str) -> list:
    import mlflow

    mlflow.set_tracking_uri("sqlite:///" + str(Path("mlflow.db").resolve()))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("prunebench.kind") == kind]


@pytest.fixture
def contexts(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every pipeline Context tune created in this test (to read the data module's test_reads counter)."""
    import prunebench.commands.tune.objective as objective

    made: list = []

    class Recording(objective.Context):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(objective, "Context", Recording)
    return made


def test_study_runs_logs_resumes_and_writes_a_runnable_tuned_recipe(
    write_recipe, tune_recipe, contexts, capsys
) -> None:
    import mlflow

    path = write_recipe(tune_recipe)
    assert main(["tune", str(path), "--trials", "3"]) == 0  # no -q: the progress lines are read below
    out = capsys.readouterr().out
    assert "l1: nothing to tune" in out and "tuned recipe: r.tuned.yaml" in out

    # the SQLite study: 3 finished trials, numbered 0..2
    assert Path("optuna.db").is_file()
    study = _study()
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert all(1e-6 <= t.params["lambda"] <= 1e-3 for t in trials)
    assert len({t.params["lambda"] for t in trials}) == 3
    best = max(trials, key=lambda t: t.value)

    # MLflow: one study run, each trial a nested run with its parameter and objective
    studies, trial_runs = _runs("study"), _runs("trial")
    assert len(studies) == 1 and len(trial_runs) == 3
    srun = studies[0]
    assert srun.data.params["best.lambda"] == str(best.params["lambda"])
    assert srun.data.metrics["best_val_top1"] == pytest.approx(best.value)
    by_number = {int(r.data.tags["prunebench.trial_number"]): r for r in trial_runs}
    for t in trials:
        run = by_number[t.number]
        assert run.data.tags["mlflow.parentRunId"] == srun.info.run_id
        assert float(run.data.params["method.lambda"]) == pytest.approx(t.params["lambda"])
        assert run.data.metrics["val_top1"] == pytest.approx(t.value)
        assert abs(run.data.metrics["macs_reduction"] - 0.4) <= 0.03
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(srun.info.run_id)}
    assert {"r.tuned.yaml", "trials.csv", "plots"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(srun.info.run_id, "plots")}
    assert {"optimization_history.png", "param_importances.png", "slice.png"} <= plots

    # the tuned recipe: the space replaced by the best value, the rest and the tune: section kept
    tuned = yaml.safe_load(Path("r.tuned.yaml").read_text())
    assert tuned["methods"] == [{"name": "oicsr", "lambda": best.params["lambda"]}, {"name": "l1"}]
    assert tuned["tune"] == tune_recipe["tune"] and tuned["data"] == tune_recipe["data"]
    assert all(c.data.test_reads == 0 for c in contexts) and contexts

    # ... which `prunebench run` accepts unchanged
    assert main(["run", "r.tuned.yaml", "-q"]) == 0
    cells = _runs("cell")
    assert len(cells) == 2 and all(c.info.status == "FINISHED" for c in cells)
    assert {c.data.params["method"] for c in cells} == {"oicsr", "l1"}

    # rerun with a larger total: the same study grows to 6 trials, in a second study run
    contexts.clear()
    capsys.readouterr()
    assert main(["tune", str(path), "--trials", "6"]) == 0
    assert "3 trials so far, topping up to 6" in capsys.readouterr().out
    assert [s.study_name for s in optuna.get_all_study_summaries("sqlite:///optuna.db")] == ["tiny-oicsr"]
    assert [t.number for t in _study().get_trials()] == list(range(6))
    assert len(_runs("study")) == 2 and len(_runs("trial")) == 6
    assert all(c.data.test_reads == 0 for c in contexts) and contexts

    # the same command again: nothing left to do, no empty study run
    assert main(["tune", str(path), "--trials", "6"]) == 0
    assert "already has 6 trials" in capsys.readouterr().out
    assert len(_study().get_trials()) == 6 and len(_runs("study")) == 2


def test_two_processes_share_one_sqlite_study(write_recipe, tune_recipe, side_by_side, tmp_path: Path) -> None:
    path = write_recipe(tune_recipe)
    finished = side_by_side(["tune", str(path), "--trials", "4"])  # no -q: the trial lines are read
    for p, out in finished:
        assert p.returncode == 0, out
        assert "locked" not in out.lower() and "Traceback" not in out, out

    trials = _study().get_trials()
    n = len(trials)
    assert 4 <= n <= 5  # a worker checks the count before each trial; both may start the last one together
    assert [t.number for t in trials] == list(range(n))  # no duplicated numbers
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers = [t.user_attrs["worker"] for t in trials]
    ran = [sum(f"trial {t.number}:" in out for t in trials) for _, out in finished]
    assert sum(ran) == n and len(set(workers)) == sum(r > 0 for r in ran)  # every trial ran exactly once
    assert len(_runs("study")) == 2 and len(_runs("trial")) == n
    assert load_recipe(tmp_path / "r.tuned.yaml").methods[0]["name"] == "oicsr"


def test_diverging_trials_are_pruned_and_the_study_goes_on(write_recipe, tune_recipe, contexts, capsys) -> None:
    # a factor this large overflows the penalty to inf at the first step: DivergedError in the training loop
    tune_recipe["tune"]["spaces"] = {"oicsr": {"lambda": {"low": 1.0e36, "high": 1.0e37, "log": True}}}
    assert main(["tune", str(write_recipe(tune_recipe)), "--trials", "2"]) == 1  # no completed trial
    out = capsys.readouterr()  # the trials' lines on stdout, the warning on stderr
    assert "diverged" in out.out and "-> diverged (" in out.out and "no completed trial for oicsr" in out.err
    trials = _study().get_trials()
    assert len(trials) == 2
    assert all(t.state == TrialState.PRUNED and t.user_attrs["failure"].startswith("diverged") for t in trials)
    runs = _runs("trial")
    assert len(runs) == 2 and all(r.data.tags["prunebench.failure"] == "diverged" for r in runs)
    assert all(r.info.status == "KILLED" for r in runs)
    assert all(c.data.test_reads == 0 for c in contexts)


def test_a_failing_trial_is_marked_failed_and_the_study_goes_on(write_recipe, tune_recipe, monkeypatch, capsys) -> None:
    import prunebench.commands.tune.objective as objective

    def boom(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(objective, "train_and_prune", boom)
    assert main(["tune", str(write_recipe(tune_recipe)), "--trials", "2", "-q"]) == 1
    assert "FAILED (RuntimeError: boom)" in capsys.readouterr().err  # a warning: shown with -q, on stderr
    trials = _study().get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.FAIL for t in trials)
    assert all(t.user_attrs["failure"] == "error: RuntimeError: boom" for t in trials)
    assert all(r.info.status == "FAILED" for r in _runs("trial"))


def test_quiet_prints_warnings_and_the_result_only(write_recipe, tune_recipe, capsys) -> None:
    """-q: no progress bars and no progress messages; the closing table and the tuned recipe's path remain."""
    assert main(["tune", str(write_recipe(tune_recipe)), "--trials", "1", "-q"]) == 0
    out, err = capsys.readouterr()
    assert "tuned recipe: r.tuned.yaml" in out and "val_top1" in out and "oicsr" in out  # the product
    for progress in ("tuning ", "trial 0", "nothing to tune", "topping up", "next:", "MLflow:", "it/s"):
        assert progress not in out and progress not in err, progress
    assert err == ""
    assert len(out.strip().splitlines()) <= 6  # the table (header, rule, one row) and the path
    assert Path("r.tuned.yaml").is_file() and len(_study().get_trials()) == 1


def test_an_unreachable_tracking_server_fails_fast(write_recipe, tune_recipe, capsys) -> None:
    """Nothing listens on the port: exit 2 with one line in seconds, before any training or study."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tune_recipe["tracking"] = {"uri": f"http://127.0.0.1:{port}"}
    t0 = time.monotonic()
    assert main(["tune", str(write_recipe(tune_recipe)), "--trials", "1", "-q"]) == 2
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err
    assert err.startswith("prunebench: error: ") and len(err.strip().splitlines()) == 1
    assert f"127.0.0.1:{port}" in err and "cannot be reached" in err
    assert not Path("optuna.db").exists() and not Path(".prunebench").exists()


def test_run_refuses_a_search_space(write_recipe, tune_recipe, capsys) -> None:
    assert main(["run", str(write_recipe(tune_recipe)), "-q"]) == 2
    err = capsys.readouterr().err
    assert "methods[0].lambda: is a search space" in err and "prunebench tune" in err
    assert not Path("mlflow.db").exists()


BAD_SPACES = [
    (
        {"methods": [{"name": "oicsr", "lambda": {"tune": [1e-3, 1e-6], "log": True}}]},
        r"methods\[0\]\.lambda: .*above high",
    ),
    ({"methods": [{"name": "oicsr", "lambda": {"tune": [0, 1e-3], "log": True}}]}, r"log-scale .* needs low > 0"),
    ({"methods": [{"name": "oicsr", "lambda": {"tune": [1e-6]}}]}, r"exactly two numbers"),
    (
        {"methods": [{"name": "oicsr", "lambda": {"tune": [-1.0, 1.0]}}]},
        r"methods\[0\]\.lambda: .*greater than or equal to 0",
    ),
    ({"tune": {"spaces": {"oicsr": {"lamda": {"low": 1e-6, "high": 1e-3}}}}}, r"no parameter 'lamda'.*'lambda'"),
    ({"tune": {"spaces": {"oicrs": {"lambda": {"low": 1e-6, "high": 1e-3}}}}}, r"tune\.spaces\.oicrs: unknown method"),
    ({"tune": {"spaces": {"oicsr": {"lambda": {"low": 1e-6}}}}}, r"needs low and high"),
    ({"tune": {"pruner": "sometimes"}}, r"tune\.pruner: "),
    ({"methods": [{"name": "l1"}, {"name": "random"}]}, r"nothing to tune"),
]


@pytest.mark.parametrize("change,message", BAD_SPACES, ids=[m for _, m in BAD_SPACES])
def test_bad_tune_input_is_one_clear_error(write_recipe, tiny_recipe, change, message, capsys) -> None:
    tiny_recipe["methods"] = [{"name": "oicsr"}]
    tiny_recipe.update(change)
    assert main(["tune", str(write_recipe(tiny_recipe))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunebench: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_bad_command_line_values(write_recipe, tune_recipe, capsys) -> None:
    assert main(["tune", str(write_recipe(tune_recipe)), "--trials", "0"]) == 2
    assert "--trials 0: " in capsys.readouterr().err
    assert main(["tune", str(write_recipe(tune_recipe)), "--methods", "vgg"]) == 2
    assert "--methods: vgg not in the recipe's methods (oicsr, l1)" in capsys.readouterr().err


def test_plan_default_spaces_skips_and_study_names(write_recipe, tiny_recipe, caplog) -> None:
    from prunebench.commands.tune.tasks import plan_tasks

    caplog.set_level(logging.INFO, logger="prunebench")

    tiny_recipe["methods"] = [
        {"name": "oicsr"},
        {"name": "oicsr", "variant": "growl"},
        {"name": "slimming", "lambda": 1e-5},
        {"name": "thinet"},
        {"name": "l1"},
        {"name": "random"},
    ]
    tiny_recipe["tune"] = {"spaces": {"slimming": {"lambda": {"low": 1e-6, "high": 1e-4, "log": True}}}}
    recipe = load_recipe(write_recipe(tiny_recipe), allow_spaces=True)
    tasks = plan_tasks(recipe, recipe.tune, None, None)
    said = caplog.text  # the skip messages are INFO log records
    assert all(f"{m}: nothing to tune" in said for m in ("thinet", "l1", "random"))
    assert [t.study for t in tasks] == ["tiny-oicsr", "tiny-oicsr(variant=growl)", "tiny-slimming"]
    lam = [t.spaces["lambda"] for t in tasks]
    # provisional: the default x/10, replaced from the schedule once the dense model exists (derived)
    assert (lam[0].low, lam[0].high, lam[0].log) == pytest.approx((2e-4, 2e-2, True))
    assert tasks[0].derived == tasks[1].derived == ("lambda",)
    assert (lam[2].low, lam[2].high) == (1e-6, 1e-4) and tasks[2].derived == ()  # tune.spaces wins over the entry
    assert tasks[1].fixed == {"variant": "growl"} and tasks[2].fixed == {}
    only = plan_tasks(recipe, recipe.tune, ["slimming"], "mine")
    assert [(t.name, t.study) for t in only] == [("slimming", "mine")]


def test_default_storage_sits_beside_the_mlflow_store(tmp_path: Path) -> None:
    from prunebench.commands.tune.study import default_storage, mask_url

    assert default_storage(f"sqlite:///{tmp_path}/runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/optuna.db"
    assert default_storage("http://mlflow:5000") == "sqlite:///optuna.db"
    assert mask_url("postgresql://me:secret@db/optuna") == "postgresql://me:***@db/optuna"


def _draws(cfg: TuneConfig, storage, name: str, n: int) -> list[float]:
    from prunebench.commands.tune.study import make_sampler

    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize", sampler=make_sampler(cfg), load_if_exists=True
    )
    study.optimize(lambda t: -abs(t.suggest_float("x", 1e-6, 1e-2, log=True) - 1e-4), n_trials=n)
    return [t.params["x"] for t in study.get_trials()]


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_sampler_is_seeded_per_trial(sampler: str) -> None:
    """Same seed: the same study; a resumed study continues the same sequence instead of replaying it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = TuneConfig(sampler=sampler, trials=6)
    storage = optuna.storages.InMemoryStorage()
    straight = _draws(cfg, storage, "a", 6)
    assert _draws(cfg, storage, "b", 6) == straight
    _draws(cfg, storage, "c", 3)
    assert _draws(cfg, storage, "c", 3) == straight  # a fresh process resuming "c": trials 3..5 as in "a"
    assert len(set(straight)) == 6
    assert _draws(cfg.model_copy(update={"sampler_seed": 1}), storage, "d", 6) != straight


def test_readme_documents_tuning() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Tuning the regularization factor") :]
    section = section[: section.find("\n## ", 3)]
    for needle in ("prunebench tune", "prunebench run", "prunebench compare", "postgresql://", "--trials"):
        assert needle in section, needle
    assert text.index("## The command line") < text.index("## Tuning the regularization factor")


def test_default_lambda_range_comes_from_the_schedule(write_recipe, tiny_recipe) -> None:
    """The derived range: the lambdas at which the trials' sparsity stage reaches sparsity_pull 0.5 and 16,
    computed here by hand from the cached dense model (slimming: median |gamma| of the pruned layers' BNs)."""
    import math as _m

    import numpy as np
    import torch

    from prunebench import cache

    tiny_recipe["methods"] = [{"name": "slimming"}]
    tiny_recipe["tune"] = {"trials": 1, "sparsity_epochs": 2, "finetune_epochs": 1}
    path = write_recipe(tiny_recipe)
    assert main(["tune", str(path), "-q"]) in (0, 1)
    study = optuna.load_study(study_name="tiny-slimming", storage=f"sqlite:///{Path.cwd()}/optuna.db")
    dist = study.trials[0].distributions["lambda"]
    recipe = load_recipe(path, allow_spaces=True)
    state = torch.load(cache.dense_path(recipe, 0), weights_only=True)["state_dict"]
    gammas = np.concatenate([state[f"layer{i}.0.bn1.weight"].abs().numpy() for i in (1, 2, 3)])
    steps = _m.ceil(72 / 32)  # 96 synthetic images, a quarter held out for validation
    from prunebench.train import lr_at  # the tiny recipe's cosine stage, step by step as the loop sets it

    sched = recipe.sparsity.model_copy(update={"epochs": 2})
    lr_sum = sum(lr_at(sched, e + i / steps) for e in range(2) for i in range(steps))
    for pull, end in ((0.5, dist.low), (16.0, dist.high)):
        assert end == pytest.approx(pull * np.median(gammas) * (1 - 0.9) / lr_sum, rel=2e-3)
    assert dist.log
