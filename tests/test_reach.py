"""Reachability before any training (``prunebench/reach.py``; docs/methods.md, "Reachability"): the largest MACs
reduction of each scope is the engine's own limit, ``scope: auto`` resolves against the recipe's largest
target, and ``prunebench run`` / ``prunebench tune`` refuse an unreachable target with exit 2 before any
dense model, dense cache or MLflow run exists -- and the cells then use the scope the check chose."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest
import torch

from prunebench.cli import main
from prunebench.engine import prune_to_target
from prunebench.errors import UserError
from prunebench.models import create_model
from prunebench.reach import Reach, measure_reach, resolve_scope
from prunebench.recipe import ModelConfig
from prunebench.registry import available_methods


def _model(name: str, num_classes: int = 4) -> torch.nn.Module:
    return create_model(ModelConfig(name=name), num_classes=num_classes)


def _reach(name: str, size: int, **kw) -> Reach:
    return measure_reach(_model(name), torch.zeros(1, 3, size, size), **kw)


def _between(reach: Reach) -> float:
    """A target (two decimals) that ``internal`` cannot reach and ``all`` can."""
    lo, hi = reach.scopes["internal"].reduction, reach.scopes["all"].reduction
    target = round((lo + hi) / 2, 2)
    assert lo < target < hi, (lo, hi)
    return target


# -- the figure and the resolution ------------------------------------------------------------------


@pytest.mark.unit
def test_reach_per_scope_and_auto_on_a_cifar_resnet() -> None:
    reach = _reach("resnet8_cifar", 16)
    internal, everything = reach.scopes["internal"], reach.scopes["all"]
    assert 0 < internal.groups < everything.groups
    assert 0.3 < internal.reduction < everything.reduction < 1
    assert resolve_scope(reach, "auto", [0.2, 0.3])[0] == "internal"
    high = _between(reach)
    scope, why = resolve_scope(reach, "auto", [0.2, high])  # the largest target decides
    assert scope == "all" and f"{internal.reduction:.3f}" in why
    assert resolve_scope(reach, "all", [high])[0] == "all"
    with pytest.raises(UserError) as err:
        resolve_scope(reach, "internal", [high], model="resnet8_cifar")
    msg = str(err.value)
    assert f"MACs target {high:g}" in msg and "resnet8_cifar" in msg and "\n" not in msg
    assert f"internal {internal.reduction:.3f}" in msg and f"all {everything.reduction:.3f}" in msg
    assert "max_layer_ratio" in msg and "prune.scope all" in msg and "lower the target" in msg
    beyond = math.ceil(everything.reduction * 100 + 1e-9) / 100
    with pytest.raises(UserError, match=rf"MACs target {beyond:g} .* prune\.scope auto"):
        resolve_scope(reach, "auto", [beyond])


@pytest.mark.unit
def test_the_cap_and_round_to_bound_the_reach() -> None:
    base = _reach("resnet8_cifar", 16)
    looser = _reach("resnet8_cifar", 16, max_layer_ratio=0.95)
    rounded = _reach("resnet8_cifar", 16, round_to=8)
    for s in ("internal", "all"):
        assert looser.scopes[s].reduction > base.scopes[s].reduction
        assert rounded.scopes[s].reduction <= base.scopes[s].reduction
    with pytest.raises(UserError, match="not a module of the model"):
        _reach("resnet8_cifar", 16, ignored_layers=["no_such_layer"])


@pytest.mark.unit
@pytest.mark.parametrize("scope", ["internal", "all"])
def test_the_reach_is_the_engines_own_limit(scope: str, one_thread) -> None:
    """Just below the figure the engine prunes (and lands at or below it); just above it refuses."""
    size = 16
    reach = _reach("resnet8_cifar", size).scopes[scope].reduction
    x = torch.zeros(1, 3, size, size)
    l1 = available_methods()["l1"]
    res = prune_to_target(_model("resnet8_cifar"), l1(), reach - 0.01, x, scope=scope, max_layer_ratio=0.8)
    assert reach - 0.01 <= res.macs_reduction <= reach + 0.002
    with pytest.raises(UserError, match="cannot reach the MACs target"):
        prune_to_target(_model("resnet8_cifar"), l1(), reach + 0.005, x, scope=scope, max_layer_ratio=0.8)


@pytest.mark.unit
def test_auto_is_internal_on_a_plain_resnet() -> None:
    reach = measure_reach(_model("resnet18", 10), torch.zeros(1, 3, 32, 32))
    assert reach.scopes["internal"].reduction > 0.5
    assert resolve_scope(reach, "auto", [0.3])[0] == "internal"


# -- through the commands ----------------------------------------------------------------------------


def test_run_refuses_an_unreachable_target_before_anything_exists(write_recipe, tiny_recipe, capsys) -> None:
    reach = _reach("resnet8_cifar", tiny_recipe["data"]["image_size"], round_to="auto")
    target = _between(reach)
    tiny_recipe["prune"] = {"target": [0.2, target], "scope": "internal"}
    tiny_recipe["dense"]["epochs"] = 50  # refused up front, or this test would take minutes
    started = time.monotonic()
    assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"MACs target {target:g} cannot be reached on resnet8_cifar" in err
    assert re.search(
        rf"internal {reach.scopes['internal'].reduction:.3f} .* all {reach.scopes['all'].reduction:.3f}", err
    )
    assert "prune.max_layer_ratio" in err and "prune.scope all" in err
    assert not Path(".prunebench").exists() and not Path("mlflow.db").exists()
    # scope auto: neither scope reaches a target past `all`'s figure
    tiny_recipe["prune"] = {"target": round(reach.scopes["all"].reduction + 0.02, 2), "scope": "auto"}
    assert main(["run", str(write_recipe(tiny_recipe)), "-q"]) == 2
    assert "with prune.scope auto" in capsys.readouterr().err
    assert not Path(".prunebench").exists() and not Path("mlflow.db").exists()


def test_auto_resolves_once_and_the_cells_use_that_scope(write_recipe, tiny_recipe, capsys) -> None:
    import mlflow

    target = _between(_reach("resnet8_cifar", tiny_recipe["data"]["image_size"], round_to="auto"))
    tiny_recipe["prune"] = {"target": target, "scope": "auto"}
    tiny_recipe["dense_control"] = False
    assert main(["run", str(write_recipe(tiny_recipe))]) == 0
    out = capsys.readouterr().out
    assert out.count("prune.scope auto -> all") == 1, out
    client = mlflow.MlflowClient(f"sqlite:///{Path.cwd()}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    cells = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("prunebench.kind") == "cell"]
    assert len(cells) == 1
    for run in cells:
        assert run.info.status == "FINISHED" and run.data.params["scope"] == "all"
        assert run.data.metrics["macs_reduction"] >= target - 1e-9


def test_tune_refuses_an_unreachable_target_before_the_dense_model_trains(write_recipe, tiny_recipe, capsys) -> None:
    target = _between(_reach("resnet8_cifar", tiny_recipe["data"]["image_size"], round_to="auto"))
    tiny_recipe["methods"] = [{"name": "oicsr", "lambda": {"tune": [1.0e-6, 1.0e-3], "log": True}}]
    tiny_recipe["tune"] = {"sparsity_epochs": 1, "finetune_epochs": 1, "target": target}
    tiny_recipe["dense"]["epochs"] = 50
    started = time.monotonic()
    assert main(["tune", str(write_recipe(tiny_recipe)), "--trials", "1", "-q"]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"MACs target {target:g} cannot be reached" in err, err
    assert "prune.scope all" in err
    assert not Path(".prunebench").exists()  # no dense model trained, nor its partial checkpoint
