"""The sparsity diagnostics (prunebench.sparsity), the pre-run pull check, the dense control and the iterative
phases: figures checked against independent computations, and end-to-end through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prunebench.cli import main
from prunebench.commands.run import CONTROL, cell_phases
from prunebench.groups import build_groups
from prunebench.models import create_model
from prunebench.recipe import Recipe, Schedule
from prunebench.registry import available_methods, build_method
from prunebench.sparsity import (
    MIN_PULL,
    ZERO_THRESHOLD,
    SparsityMonitor,
    lambda_for_pull,
    lr_sum,
    sparsity_pull,
    steps_per_epoch,
)
from prunebench.train import EpochStats, lr_at, train

REGULARIZED = sorted(n for n, cls in available_methods().items() if cls.has_sparsity_training())


def _attached(spec: dict, seed: int = 0):
    from prunebench.recipe import ModelConfig

    torch.manual_seed(seed)
    model = create_model(ModelConfig(name="resnet8_cifar"), num_classes=4, in_chans=3)
    x = torch.zeros(1, 3, 16, 16)
    _, groups = build_groups(model, x, scope="internal")
    method = build_method(spec)
    method.attach(model, groups)
    return model, groups, method


def test_the_regularized_methods_are_the_papers() -> None:
    assert {"oicsr", "group_lasso", "slimming"} <= set(REGULARIZED)
    assert not {"l1", "random", "thinet"} & set(REGULARIZED)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_lr_sum_is_the_loops_learning_rates(schedule: str) -> None:
    sched = Schedule(
        epochs=3, lr=0.05, schedule=schedule, milestones=[1], warmup_epochs=1 if schedule == "cosine" else 0
    )
    n = 7
    by_hand = 0.0
    for epoch in range(3):
        for i in range(n):
            by_hand += lr_at(sched, epoch + i / n)
    assert lr_sum(sched, n) == pytest.approx(by_hand)
    if schedule == "constant":
        assert lr_sum(sched, n) == pytest.approx(3 * 7 * 0.05)
    assert steps_per_epoch(100, 32) == 4 and steps_per_epoch(96, 32) == 3


@pytest.mark.parametrize("name", REGULARIZED)
def test_pull_is_lambda_times_lr_sum_over_the_median(name: str) -> None:
    _, _, method = _attached({"name": name, "lambda": 0.01})
    sched = Schedule(epochs=2, lr=0.02, momentum=0.9, schedule="constant")
    norms = torch.cat([n.flatten() for n in method.regularized_norms()]).numpy()
    amplification = 10.0  # 1/(1-0.9): the pull goes through the gradient
    if getattr(method.params, "mode", "loss") == "proximal":
        amplification = 1.0
    expected = 0.01 * (2 * 5 * 0.02) * amplification / np.median(norms)
    assert sparsity_pull(method, sched, 5) == pytest.approx(expected, rel=1e-5)
    unit = build_method({"name": name, "lambda": 1.0})
    unit.attach(method.model, method.groups)
    lam = lambda_for_pull(unit, sched, 5, 1.0)
    assert sparsity_pull(build_and_attach(name, lam, method), sched, 5) == pytest.approx(1.0, rel=1e-5)


def build_and_attach(name: str, lam: float, like):
    m = build_method({"name": name, "lambda": lam})
    m.attach(like.model, like.groups)
    return m


def test_proximal_pull_has_no_momentum_amplification() -> None:
    _, _, loss = _attached({"name": "oicsr", "lambda": 0.01, "mode": "loss"})
    prox = build_method({"name": "oicsr", "lambda": 0.01, "mode": "proximal"})
    prox.attach(loss.model, loss.groups)
    sched = Schedule(epochs=1, lr=0.1, momentum=0.9, schedule="constant")
    assert sparsity_pull(loss, sched, 4) == pytest.approx(10 * sparsity_pull(prox, sched, 4))


def test_methods_without_regularizer_have_no_diagnostics() -> None:
    for name in ("l1", "random", "thinet"):
        _, _, method = _attached({"name": name})
        assert method.regularized_norms() == [] and method.pull_per_lr(0.9) == 0.0
        assert SparsityMonitor.start_of_stage(method, Schedule(epochs=1), 3) is None


def test_zero_fraction_against_numpy_and_the_norms_record() -> None:
    _, groups, method = _attached({"name": "oicsr", "lambda": 0.01})
    mon = SparsityMonitor.start_of_stage(method, Schedule(epochs=1, lr=0.1), 3)
    assert mon is not None and mon.zero_frac() == 0.0
    start = [n.detach().numpy().copy() for n in method.regularized_norms()]
    medians = [np.median(s) for s in start]
    # zero whole out-in groups: three channels of the first group, one of the second
    from prunebench.norms import group_slices

    with torch.no_grad():
        for g, chans in ((groups[0], [0, 1, 2]), (groups[1], [3])):
            factor = torch.ones(g.size)
            factor[chans] = 0.01 * ZERO_THRESHOLD  # well under the threshold
            group_slices(g, "all").scale_(factor)
    now = [n.detach().numpy() for n in method.regularized_norms()]
    expected = np.mean(np.concatenate([n / m for n, m in zip(now, medians)]) < ZERO_THRESHOLD)
    assert mon.zero_frac() == pytest.approx(expected) and expected == pytest.approx(4 / sum(g.size for g in groups))
    rec = mon.norms_record()
    assert len(rec["start"]) == len(rec["end"]) == sum(g.size for g in groups)
    assert np.median(rec["start"][: groups[0].size]) == pytest.approx(1.0, abs=1e-5)
    stats = EpochStats(epoch=0, train_loss=2.0, train_penalty=0.0, train_top1=0.5, lr=0.1, images_per_s=1.0)
    out = mon.epoch_end(stats)
    assert out["penalty_ratio"] == pytest.approx(float(method.regularizer_value()) / 2.0)
    assert set(out) == {"sparsity_zero_frac", "penalty_ratio", "sparsity_pull"}


@pytest.mark.parametrize("name", REGULARIZED)
def test_a_strong_regularizer_zeroes_channels_and_a_weak_one_does_not(name: str) -> None:
    """The invariant behind the diagnostic: pull well above 1 drives channels to zero, pull ~0 leaves them."""
    from prunebench.data import load_data
    from prunebench.recipe import DataConfig

    # In loss mode a group at zero oscillates by lr*lambda/(1-mu) a step (pull / steps of the median norm):
    # the stage needs many more steps than the pull to settle under the 5% threshold -- 96 steps here.
    data = load_data(
        DataConfig(name="synthetic", num_samples=64, image_size=16, num_classes=4, val_split=0, batch_size=8),
        torch.device("cpu"),
    )
    sched = Schedule(epochs=12, lr=0.05, momentum=0.9, weight_decay=0, schedule="constant")
    steps = steps_per_epoch(64, 8)
    fracs = {}
    for pull in (1e-3, 3.0):
        model, groups, probe = _attached({"name": name, "lambda": 1.0})
        method = build_and_attach(name, lambda_for_pull(probe, sched, steps, pull), probe)
        mon = SparsityMonitor.start_of_stage(method, sched, steps)
        assert mon.pull == pytest.approx(pull, rel=1e-4)
        train(
            model, lambda e: data.train_batches(8, torch.Generator().manual_seed(e)), sched, method=method, quiet=True
        )
        fracs[pull] = mon.zero_frac()
    assert fracs[1e-3] == 0.0
    assert fracs[3.0] >= 0.2, fracs


def test_group_lasso_scores_the_group_it_regularizes() -> None:
    from prunebench.norms import group_slices, member_slice

    _, groups, gl = _attached({"name": "group_lasso"})
    filt = build_method({"name": "group_lasso", "score": "filter"})
    g = groups[0]
    with torch.no_grad():  # make the BN part matter: the filter alone would rank differently
        norm = g.norm_layer()
        norm.weight.copy_(torch.linspace(2.0, 0.1, g.size))
    whole = torch.sqrt(
        sum(
            ((p.detach().movedim(d, 0).reshape(p.shape[d], -1)) ** 2).sum(1)
            for s in group_slices(g, "root").slices
            for p, d in [(s.param, s.dim)]
        )
    )
    assert torch.allclose(gl.score(g), whole, rtol=1e-5)
    root = next(m for m in g.part("out") if m.module is g.root)
    assert torch.allclose(filt.score(g), member_slice(root, root.module.weight, 0).sq_norms().sqrt(), rtol=1e-5)
    assert not torch.equal(torch.argsort(gl.score(g)), torch.argsort(filt.score(g)))


def test_iterative_phases_keep_the_regularizer_on(tiny_recipe) -> None:
    tiny_recipe["prune"]["iterations"] = 3
    recipe = Recipe.model_validate(tiny_recipe)
    oicsr = build_method({"name": "oicsr"})
    phases = cell_phases(recipe, oicsr)
    assert [p.stage for p in phases] == ["sparsity", "prune", "between", "prune", "between", "prune", "finetune"]
    assert [p.with_method for p in phases if p.stage in ("sparsity", "between")] == [True, True, True]
    assert not next(p for p in phases if p.stage == "finetune").with_method
    l1 = build_method({"name": "l1"})
    assert not any(p.with_method for p in cell_phases(recipe, l1))
    control = cell_phases(recipe, build_method({"name": "l1"}), prune=False)
    assert [p.stage for p in control] == ["sparsity", "between", "between", "finetune"]


# -- through the CLI ----------------------------------------------------------------------------------


def test_an_inert_regularizer_warns_and_require_pull_refuses_before_training(
    write_recipe, tiny_recipe, capsys, caplog
) -> None:
    tiny_recipe["methods"] = [{"name": "oicsr", "lambda": 1e-6}]
    tiny_recipe["dense"]["epochs"] = 3
    tiny_recipe["sparsity"]["require_pull"] = True
    assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 2
    err = capsys.readouterr().err
    assert "oicsr(lambda=1e-06)" in err and "sparsity_pull" in err and "prunebench tune" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert not Path(".prunebench").exists() and not Path("mlflow.db").exists()  # nothing trained, nothing logged
    # as a warning (the default), the run goes on
    tiny_recipe["sparsity"]["require_pull"] = False
    tiny_recipe["dense"]["epochs"] = 1
    with caplog.at_level("WARNING", logger="prunebench"):
        assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 0
    assert any("sparsity_pull" in r.getMessage() and f"< {MIN_PULL}" in r.getMessage() for r in caplog.records)


def test_run_logs_diagnostics_norms_and_a_dense_control(write_recipe, tiny_recipe) -> None:
    import mlflow

    tiny_recipe["methods"] = [{"name": "slimming", "lambda": 0.5}, {"name": "l1"}]
    assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd()}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    kinds = {r.data.params.get("method"): r for r in runs if r.data.tags.get("prunebench.kind") in ("cell", "control")}
    assert set(kinds) == {"slimming", "l1", "dense_control"}
    slim, l1, control = kinds["slimming"], kinds["l1"], kinds["dense_control"]
    assert control.data.tags["prunebench.kind"] == "control" and "target" not in control.data.params
    assert control.data.params["method_label"] == "dense (same epochs)"
    assert control.data.metrics["macs_reduction"] == 0.0 and 0 <= control.data.metrics["test_top1"] <= 1
    assert [h.step for h in client.get_metric_history(control.info.run_id, "train_loss")] == [0, 1]
    m = slim.data.metrics
    assert {"sparsity_zero_frac", "sparsity_pull", "penalty_ratio"} <= set(m)
    assert 0 <= m["sparsity_zero_frac"] <= 1 and m["penalty_ratio"] > 0
    # the pull logged is lambda * sum(lr) / (1 - momentum) over the median |gamma| at the start of the stage
    rec = json.loads(Path(client.download_artifacts(slim.info.run_id, "sparsity_norms.json")).read_text())
    assert len(rec["start"]) == len(rec["end"]) > 0
    assert [h.step for h in client.get_metric_history(slim.info.run_id, "sparsity_zero_frac")] == [0]
    assert "sparsity_zero_frac" not in l1.data.metrics
    # the control saw the cells' data: same number of training epochs and the same dense start
    assert control.data.metrics["dense_test_top1"] == l1.data.metrics["dense_test_top1"]
    assert math.isfinite(m["sparsity_pull"]) and m["sparsity_pull"] > 0


def test_control_is_optional(write_recipe, tiny_recipe) -> None:
    import mlflow

    tiny_recipe["dense_control"] = False
    assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd()}/mlflow.db")
    exp = mlflow.get_experiment_by_name("tiny")
    runs = mlflow.MlflowClient().search_runs([exp.experiment_id])
    assert not [r for r in runs if r.data.tags.get("prunebench.kind") == "control"]
    assert CONTROL["name"] == "dense_control"


# -- the shipped quickstart: its lambdas act ---------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart_dense(tmp_path_factory):
    """The quickstart's dense model of seed 0 (8 epochs on digits, ~15 s), trained once for this module."""
    import os

    from conftest import ROOT
    from prunebench.commands.run import Context, dense_model
    from prunebench.registry import load_recipe

    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("quickstart"))
    try:
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["seeds=[0]"])
        ctx = Context(recipe, quiet=True)
        yield ctx, dense_model(ctx, 0)
    finally:
        os.chdir(here)


def _plan_after_sparsity(ctx, dense, spec: dict):
    import copy

    from prunebench.engine import MacsCostModel, plan_global, score_groups
    from prunebench.measure import count_macs
    from prunebench.train import seed_everything

    recipe = ctx.recipe
    seed_everything(0)
    model = copy.deepcopy(dense)
    _, groups = build_groups(model, ctx.example, scope=recipe.prune.scope)
    method = build_method(spec)
    method.attach(model, groups)
    steps = steps_per_epoch(ctx.data.split_sizes()["train"], recipe.data.batch_size)
    monitor = SparsityMonitor.start_of_stage(method, recipe.sparsity, steps)
    train(model, ctx.batches_for(0, "sparsity"), recipe.sparsity, method=method, opts=recipe.train, quiet=True)
    report = count_macs(model, ctx.example)
    plan = plan_global(
        groups,
        score_groups(method, groups),
        MacsCostModel(model, groups, report),
        report.macs * (1 - recipe.prune.targets[0]),
        max_layer_ratio=recipe.prune.max_layer_ratio,
    )
    return [sorted(p.tolist()) for p in plan], monitor.zero_frac()


@pytest.mark.parametrize("name", REGULARIZED)
def test_shipped_quickstart_lambdas_change_the_plan_and_zero_channels(quickstart_dense, name: str) -> None:
    """At the quickstart's lambda each regularized method prunes other channels than at lambda = 0 (where it
    would be its importance score on a plainly trained network) and drives channels to zero."""
    ctx, dense = quickstart_dense
    spec = next(m for m in ctx.recipe.methods if m["name"] == name)
    assert spec.get("lambda", 0) > 0, f"the quickstart must carry a tuned lambda for {name}"
    shipped, zeroed = _plan_after_sparsity(ctx, dense, spec)
    inert, zeroed_at_0 = _plan_after_sparsity(ctx, dense, {**spec, "lambda": 0.0})
    assert shipped != inert
    assert zeroed > zeroed_at_0 and zeroed >= 0.2, (zeroed, zeroed_at_0)


def test_checks_do_not_change_identity_and_the_control_name_is_reserved(tiny_recipe) -> None:
    from prunebench import cache
    from prunebench.method import PruningMethod
    from prunebench.recipe import TuneConfig
    from prunebench.registry import register_method

    a = Recipe.model_validate(tiny_recipe)
    tiny_recipe["sparsity"]["require_pull"] = True
    b = Recipe.model_validate(tiny_recipe)
    assert cache.recipe_key(a) == cache.recipe_key(b)  # turning the check on keeps --resume finding the runs
    with pytest.raises(ValueError, match="reserved"):
        register_method("dense_control")(type("Fake", (PruningMethod,), {}))
    for bad in ([16, 0.5], [0, 1], [1, float("inf")]):
        with pytest.raises(ValueError, match="pull_range"):
            TuneConfig(pull_range=bad)
