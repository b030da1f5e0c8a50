"""Recipe loading: every shipped recipe validates; bad input is one clear UserError with file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from prunebench.errors import UserError
from prunebench.recipe import Recipe, apply_override
from prunebench.registry import load_recipe

pytestmark = pytest.mark.unit

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.methods and recipe.seed_list and recipe.prune.targets


def test_shipped_recipes_cover_every_registered_method() -> None:
    from prunebench.registry import available_methods

    builtin = {n for n, c in available_methods().items() if c.__module__.startswith("prunebench.methods.")}
    assert {"oicsr", "group_lasso", "slimming", "thinet", "l1", "random"} <= builtin
    for name in ("quickstart.yaml", "cifar10_resnet56.yaml"):
        listed = {m["name"] for m in load_recipe(ROOT / "recipes" / name).methods}
        assert listed == builtin, name


def test_paper_recipe_scale() -> None:
    r = load_recipe(ROOT / "recipes" / "cifar10_resnet56.yaml")
    assert r.model.name == "resnet56_cifar" and r.data.name == "cifar10" and r.data.download
    assert r.dense.epochs >= 160 and r.prune.targets == [0.5] and len(r.seed_list) == 3


def test_defaults_and_seed_count(write_recipe, tiny_recipe) -> None:
    tiny_recipe["seeds"] = 3
    r = load_recipe(write_recipe(tiny_recipe))
    assert r.seed_list == [0, 1, 2]
    assert r.experiment == "tiny"
    assert r.prune.max_layer_ratio == 0.8


def test_overrides_parse_yaml(write_recipe, tiny_recipe) -> None:
    path = write_recipe(tiny_recipe)
    r = load_recipe(
        path,
        [
            "finetune.epochs=2",
            "seeds=[0, 5]",
            "methods=[{name: random}, {name: l1}]",
            "prune.target=[0.3,0.5]",
            "tracking.uri=sqlite:///x.db",
        ],
    )
    assert r.finetune.epochs == 2 and r.seed_list == [0, 5]
    assert [m["name"] for m in r.methods] == ["random", "l1"]
    assert r.prune.targets == [0.3, 0.5] and r.tracking.uri == "sqlite:///x.db"


def test_override_list_index() -> None:
    data = {"methods": [{"name": "oicsr", "lambda": 1}]}
    apply_override(data, "methods[0].lambda=1e-4")
    assert data["methods"][0]["lambda"] == 1e-4


def test_extends_merges_parent_first(write_recipe, tiny_recipe) -> None:
    write_recipe(tiny_recipe, "base.yaml")
    child = write_recipe("extends: base.yaml\nname: child\nfinetune: {epochs: 3}\n", "child.yaml")
    r = load_recipe(child)
    assert r.name == "child" and r.finetune.epochs == 3 and r.finetune.lr == 0.01  # lr kept from the parent
    assert r.data.name == "synthetic"


BAD = [
    ("name: [unclosed\n", r"r\.yaml:\d+:\d+: YAML syntax error"),
    ("", "the recipe is empty"),
    ("- a\n- b\n", "must be a mapping"),
    ({"datta": {}}, r"datta: unknown key\. Did you mean 'data'"),
    ({"dense": {"epochz": 3}}, r"dense\.epochz: unknown key\. Did you mean 'epochs'"),
    ({"dense": {"epochs": "many"}}, r"dense\.epochs: .*integer"),
    ({"prune": {"target": 1.5}}, r"prune\.target: .*strictly between 0 and 1"),
    ({"prune": {"target": 0}}, r"prune\.target: .*strictly between 0 and 1"),
    ({"prune": {"target": [0.3, 1.0]}}, r"prune\.target: .*strictly between 0 and 1"),
    ({"finetune": {"epochs": 1, "lr": -0.1}}, r"finetune\.lr: .*greater than 0"),
    (
        {"dense": {"epochs": 0}},
        r"dense\.epochs must be at least 1 unless dense\.checkpoint is given or model\.pretrained",
    ),
    ({"prune": {"max_layer_ratio": 1.5}}, r"prune\.max_layer_ratio: .*less than or equal to 1"),
    ({"prune": {"max_layer_ratio": 0}}, r"prune\.max_layer_ratio: .*greater than 0"),
    ({"methods": [{"name": "l2"}]}, r"methods\[0\]: unknown method 'l2'\. Did you mean 'l1'"),
    ({"methods": [{"name": "l1", "lambda": 1}]}, r"methods\[0\]\.lambda: method 'l1' has no parameter"),
    ({"methods": []}, r"methods: .*at least 1"),
    ({"seeds": 0}, r"seeds: .*positive"),
    ({"plugins": ["nope.py"]}, r"plugins: plugin file 'nope.py' does not exist"),
    ({"data": {"name": "mnist"}}, r"data\.name: .*'cifar10'"),
]


@pytest.mark.parametrize("patch,pattern", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_recipes_are_one_line_user_errors(write_recipe, tiny_recipe, patch, pattern) -> None:
    if isinstance(patch, dict):
        for k, v in patch.items():
            if isinstance(v, dict) and isinstance(tiny_recipe.get(k), dict):
                tiny_recipe[k] = {**tiny_recipe[k], **v}
            else:
                tiny_recipe[k] = v
        path = write_recipe(tiny_recipe)
    else:
        path = write_recipe(patch)
    with pytest.raises(UserError, match=pattern) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)
    assert "r.yaml" in str(info.value) or "override" in str(info.value)


def test_extends_cycle_and_missing_parent(write_recipe) -> None:
    write_recipe("extends: b.yaml\nname: a\n", "a.yaml")
    b = write_recipe("extends: a.yaml\nname: b\n", "b.yaml")
    with pytest.raises(UserError, match="'extends' cycle: b.yaml -> a.yaml -> b.yaml"):
        load_recipe(b)
    c = write_recipe("extends: missing.yaml\nname: c\n", "c.yaml")
    with pytest.raises(UserError, match="parent recipe 'missing.yaml' not found"):
        load_recipe(c)


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("finetune.epochs", "expected KEY=VALUE"),
        ("fine tune=2", "bad key"),
        ("finetune.epochs=[1", "not valid YAML"),
        ("finetune.epokhs=2", r"finetune\.epokhs: unknown key\. Did you mean 'epochs'"),
        ("methods[9].lambda=1", r"index \[9\] is out of range"),
    ],
)
def test_bad_overrides(write_recipe, tiny_recipe, override, pattern) -> None:
    with pytest.raises(UserError, match=pattern):
        load_recipe(write_recipe(tiny_recipe), [override])


def test_plugin_file_registers_method(write_recipe, tiny_recipe, tmp_path) -> None:
    (tmp_path / "my_plugin.py").write_text(
        "import torch\nfrom prunebench import PruningMethod, register_method\n"
        "@register_method('test_plugin_recipe')\nclass P(PruningMethod):\n"
        "    description = 'x'\n    def score(self, group):\n        return torch.ones(group.size)\n"
    )
    (tmp_path / "empty_plugin.py").write_text("x = 1\n")
    tiny_recipe["plugins"] = ["my_plugin.py"]
    tiny_recipe["methods"] = [{"name": "test_plugin_recipe"}]
    assert load_recipe(write_recipe(tiny_recipe)).methods[0]["name"] == "test_plugin_recipe"
    tiny_recipe["plugins"] = ["empty_plugin.py"]
    with pytest.raises(UserError, match="registers no method"):
        load_recipe(write_recipe(tiny_recipe))


def test_a_dense_start_is_trained_loaded_or_pretrained(tmp_path: Path) -> None:
    """dense.epochs 0 needs weights from somewhere: a checkpoint, or the model's pretrained ones."""

    def load(**changes) -> Recipe:
        doc = {"name": "r", "data": {"name": "digits"}, "methods": [{"name": "l1"}], **changes}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
        return load_recipe(tmp_path / "r.yaml")

    with pytest.raises(UserError, match="dense.epochs must be at least 1 unless"):
        load(model={"name": "resnet8_cifar"}, dense={"epochs": 0})
    assert load(model={"name": "resnet50.tv_in1k", "pretrained": True}, dense={"epochs": 0}).dense.epochs == 0
    loaded = load(model={"name": "resnet8_cifar"}, dense={"epochs": 0, "checkpoint": "dense.pt"})
    assert loaded.dense.checkpoint == "dense.pt"
