"""The pruning engine: groups, global-greedy and uniform plans, the real cut, serialization.

Every registered method is pruned on every model of the matrix (CIFAR models at 32x32, timm models
at 64x64 with 10 classes): the MACs reduction must land in the matched-budget band [target, target +
tolerance] on all of them (0.1 percentage point there; see tests/test_budget.py), no group may be
emptied or exceed its cap, and the pruned model must run forward and backward. Methods that select channels from calibration data get random images.
"""

from __future__ import annotations

import logging
import math

import pytest
import timm
import torch
from torch import Tensor, nn

import prunebench.models  # noqa: F401  (registers the CIFAR models into timm)
from prunebench.budget import MacsCostModel, layer_cap
from prunebench.engine import cut, plan_global, prune_to_target, score_groups
from prunebench.errors import UserError
from prunebench.groups import PrunableGroup, build_groups
from prunebench.measure import count_macs
from prunebench.method import Calibration, PruningMethod
from prunebench.registry import available_methods
from prunebench.serialize import load_pruned, save_pruned

pytestmark = pytest.mark.unit


CIFAR = ["resnet20_cifar", "vgg16_cifar", "densenet40_cifar"]
TIMM = ["resnet18", "resnet50", "mobilenetv2_100", "densenet121"]
TOL = 0.02
TARGET = 0.4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread from a fixed seed (conftest.one_thread)."""


def make(name: str) -> tuple[nn.Module, Tensor]:
    """A model and an example input (batch of one) at the size the tests use for it."""
    size = 32 if name.endswith("_cifar") else 64
    return timm.create_model(name, pretrained=False, num_classes=10), torch.randn(1, 3, size, size)


def needs_calibration(cls: type[PruningMethod]) -> bool:
    return cls.calibrated


def method_model_cases() -> list:
    """Every method on every model; calibration-based methods only on the small models (time)."""
    cases = []
    for mname, cls in available_methods().items():
        for model in CIFAR + TIMM:
            heavy = model in ("resnet50", "densenet121", "mobilenetv2_100")
            if needs_calibration(cls) and heavy:
                continue
            cases.append(pytest.param(mname, model, id=f"{mname}-{model}"))
    return cases


def calibration(model: nn.Module, x: Tensor) -> Calibration:
    return Calibration(model=model, batches=[torch.randn(4, *x.shape[1:])])


# -- the method x model matrix ---------------------------------------------------------------------


@pytest.mark.parametrize("method_name,model_name", method_model_cases())
def test_prune_to_target(method_name: str, model_name: str) -> None:
    model, x = make(model_name)
    cls = available_methods()[method_name]
    method = cls()
    params_before = sum(p.numel() for p in model.parameters())
    calib = calibration(model, x) if needs_calibration(cls) else None
    if calib is not None:
        model.eval()
    res = prune_to_target(model, method, TARGET, x, calib=calib, max_layer_ratio=0.8)

    assert TARGET <= res.macs_reduction <= TARGET + res.tolerance, (res.macs_reduction, res.tolerance)
    assert res.macs_after < res.macs_before and res.params_after < params_before
    assert res.macs_conv_fc_after <= res.macs_after
    assert sum(res.removed.values()) > 0
    rows = {r["name"]: r for r in res.layers}
    for name, n in res.removed.items():
        row = rows[name]  # every group root is a conv/linear layer of the table
        assert n <= math.floor(0.8 * row["out_before"] + 1e-9), (name, n, row)
        assert row["out_after"] == row["out_before"] - n >= 1
    modules = dict(model.named_modules())
    for row in res.layers:  # the table reflects real tensors
        w = modules[row["name"]].weight
        assert w.shape[0] == row["out_after"]
    assert sum(r["out_after"] for r in res.layers) < sum(r["out_before"] for r in res.layers)

    # the method was re-attached to the pruned model's groups: its regularizer keeps working
    assert method.groups and all(g.size == g.root.weight.shape[0] for g in method.groups)
    model.train()
    y = model(torch.randn(2, *x.shape[1:]))
    assert y.shape == (2, 10)
    penalty = method.penalty()
    loss = y.square().mean() + (penalty if penalty is not None else 0.0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_resnet56_prunes_to_half_the_macs() -> None:
    """Its time budget is the engine_s target of `prunebench bench` (no wall-clock assert in a test)."""
    model, x = make("resnet56_cifar")
    res = prune_to_target(model, available_methods()["l1"](), 0.5, x)
    work = res.timings["groups"] + res.timings["plan"] + res.timings["cut"]
    print(
        f"resnet56 -> 50%: {work:.2f} s pruning + {res.timings['count']:.2f} s fvcore; achieved {res.macs_reduction:.4f}"
    )
    assert abs(res.macs_reduction - 0.5) <= TOL


# -- groups ----------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """conv-bn-relu -> conv-bn-relu -> flatten (C*H*W features) -> linear -> linear (classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_flatten_member_owns_several_features() -> None:
    model, x = Tiny(), torch.randn(1, 3, 4, 4)
    _, groups = build_groups(model, x)
    by_name = {g.name: g for g in groups}
    assert set(by_name) == {"conv", "fc1"}  # stem and classifier never pruned
    g = by_name["conv"]
    fc1 = next(m for m in g.members if m.module is model.fc1)
    assert fc1.kind == "in" and fc1.idxs.shape == (6, 16)
    assert torch.equal(fc1.idxs, torch.arange(96).reshape(6, 16))
    assert {(m.name, m.kind) for m in g.members} == {("conv", "out"), ("bn", "out"), ("fc1", "in")}
    res = prune_to_target(model, available_methods()["l1"](), 0.3, x, max_layer_ratio=0.9)
    assert model.fc1.in_features == 16 * model.conv.out_channels
    assert model(x).shape == (1, 3)
    assert res.macs_reduction >= 0.3


def test_scope_and_coupling() -> None:
    model, x = make("resnet20_cifar")
    _, internal = build_groups(model, x, scope="internal")
    _, every = build_groups(model, x, scope="all")
    assert len(internal) == 9 and not any(g.coupled for g in internal)
    assert all(g.name.endswith("conv1") for g in internal)
    coupled = [g for g in every if g.coupled]
    assert len(coupled) == 2  # stage-2 and stage-3 streams; stage 1 contains the stem
    for g in internal:
        assert [(m.kind, type(m.module)) for m in g.members] == [
            ("out", nn.Conv2d),
            ("out", nn.BatchNorm2d),
            ("in", nn.Conv2d),
        ]
    dn, xd = make("densenet40_cifar")
    _, auto = build_groups(dn, xd, scope="auto")
    assert auto and all(g.coupled for g in auto)  # no internal pair: auto falls back to all
    with pytest.raises(UserError, match="scope 'all'"):
        build_groups(dn, xd, scope="internal")


def test_depthwise_groups_are_internal_and_rooted_at_the_producer() -> None:
    model, x = make("mobilenetv2_100")
    _, groups = build_groups(model, x, scope="internal")
    with_dw = [g for g in groups if any(m.module.groups > 1 for m in g.members if isinstance(m.module, nn.Conv2d))]
    assert with_dw
    for g in with_dw:
        assert not g.coupled and g.root.groups == 1 and g.name.endswith("conv_pw")


def test_never_pruned_layers() -> None:
    model, x = make("resnet20_cifar")
    _, groups = build_groups(model, x, scope="all", ignored_layers=["layer1.0.conv1"])
    names = {g.name for g in groups}
    assert "layer1.0.conv1" not in names and "layer1.1.conv1" in names
    for g in groups:  # neither classifier nor stem lose out-channels
        outs = {m.module for m in g.members if m.kind == "out"}
        assert model.fc not in outs and model.conv1 not in outs
    with pytest.raises(UserError, match="layer1.0.conv1"):
        build_groups(model, x, ignored_layers=["layer1.0.cnv1"])
    with pytest.raises(UserError, match="nothing to prune"):
        build_groups(
            model, x, scope="internal", ignored_layers=[f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
        )


# -- the docs/methods.md invariant ----------------------------------------------------------------------


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("zero_whole_group", [True, False])
def test_zeroed_out_in_group_is_removable(zero_whole_group: bool) -> None:
    model, x = make("resnet20_cifar")
    _randomize_bn(model)
    model.eval()
    graph, groups = build_groups(model, x, scope="internal")
    g = next(g for g in groups if g.name == "layer2.1.conv1")
    ch = 5
    with torch.no_grad():
        bn = g.norm_layer()
        bn.bias[ch], bn.running_mean[ch] = 1.0, 0.0  # a zero filter then still gives BN output 1 > 0
        for m in g.members if zero_whole_group else g.part("root")[:1]:  # the whole group, or the filter only
            for p, dim in m.params():
                p.index_fill_(dim, m.idxs[ch], 0.0)
    inputs = torch.randn(4, *x.shape[1:])
    with torch.no_grad():
        before = model(inputs)
    cut(graph, groups, [torch.tensor([ch]) if h is g else torch.empty(0, dtype=torch.long) for h in groups])
    assert model.layer2[1].conv1.out_channels == 31 and model.layer2[1].conv2.in_channels == 31
    with torch.no_grad():
        after = model(inputs)
    assert torch.allclose(before, after, atol=1e-5) == zero_whole_group


# -- planning details ------------------------------------------------------------------------------


def test_cost_model_matches_fvcore_after_cut() -> None:
    model, x = make("resnet18")
    graph, groups = build_groups(model, x, scope="all")
    report = count_macs(model, x)
    cost = MacsCostModel(model, groups, report)
    scores = score_groups(available_methods()["random"](), groups)
    plan = plan_global(groups, scores, cost, report.macs * 0.6)
    cut(graph, groups, plan)
    real = count_macs(model, x).macs
    assert abs(cost.macs - real) / report.macs < 1e-3  # only pooling is outside the model


def test_iterative_targets_stay_relative_to_dense() -> None:
    model, x = make("resnet20_cifar")
    dense = count_macs(model, x).macs
    l1 = available_methods()["l1"]()
    first = prune_to_target(model, l1, 0.25, x, reference_macs=dense)
    second = prune_to_target(model, l1, 0.5, x, reference_macs=dense)
    assert abs(first.macs_reduction - 0.25) <= TOL
    assert abs(second.macs_reduction - 0.5) <= TOL
    assert second.macs_before == first.macs_after
    again = prune_to_target(model, l1, 0.5, x, reference_macs=dense)  # already there: removes nothing
    assert sum(again.removed.values()) == 0


def test_round_to_keeps_multiples() -> None:
    plain_model, x = make("vgg16_cifar")
    plain = prune_to_target(plain_model, available_methods()["l1"](), 0.5, x)
    model, _ = make("vgg16_cifar")
    rounded = prune_to_target(model, available_methods()["l1"](), 0.5, x, round_to=16)
    print(f"vgg16 -> 50%: achieved {plain.macs_reduction:.4f} plain, {rounded.macs_reduction:.4f} with round_to=16")
    assert abs(plain.macs_reduction - 0.5) <= TOL and abs(rounded.macs_reduction - 0.5) <= 0.03
    for row in rounded.layers:
        if row["name"] in rounded.removed and row["out_before"] > 16:
            assert row["out_after"] % 16 == 0, row


def test_layer_cap() -> None:
    assert layer_cap(10, 0.8) == 8 and layer_cap(10, 1.0) == 9 and layer_cap(1, 0.8) == 0
    assert layer_cap(64, 0.8, round_to=16) == 48  # remaining 16 = ceil(12.8 / 16) * 16


def test_unreachable_target_is_a_user_error() -> None:
    model, x = make("resnet20_cifar")
    with pytest.raises(UserError, match="max_layer_ratio"):
        prune_to_target(model, available_methods()["l1"](), 0.6, x, max_layer_ratio=0.2)


class _FirstChannels(PruningMethod):
    """A uniform method whose select() removes the first channels (to see that select is obeyed)."""

    name = "first-channels"
    uniform = True

    def select(self, group: PrunableGroup, n_remove: int, calib: Calibration) -> Tensor:
        assert calib.batches
        return torch.arange(n_remove)


class _UniformL1(PruningMethod):
    name = "uniform-l1"
    uniform = True

    def score(self, group: PrunableGroup) -> Tensor:
        return group.root.weight.detach().abs().flatten(1).sum(1)


def test_uniform_plan_uses_one_ratio_and_select() -> None:
    model, x = make("resnet56_cifar")
    kept = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("conv1") and "layer" in n}
    res = prune_to_target(model, _FirstChannels(), 0.4, x, calib=calibration(model, x))
    assert 0.4 <= res.macs_reduction <= 0.4 + res.tolerance  # the matched-budget band (tests/test_budget.py)
    rows = {r["name"]: r for r in res.layers}
    # one ratio r for all groups, up to one channel: r * size - 1 <= n <= r * size + 1 for every group
    sizes = {g: rows[g]["out_before"] for g in res.removed}
    low = max((n - 1) / sizes[g] for g, n in res.removed.items())
    assert low <= min((n + 1) / sizes[g] for g, n in res.removed.items())
    for name, w in kept.items():
        n = res.removed[name]
        assert torch.equal(dict(model.named_modules())[name].weight, w[n:])  # the first n went
    model2, _ = make("resnet56_cifar")
    res2 = prune_to_target(model2, _UniformL1(), 0.4, x)  # no select(): lowest scores
    assert 0.4 <= res2.macs_reduction <= 0.4 + res2.tolerance
    with pytest.raises(UserError, match="calib"):
        prune_to_target(make("resnet20_cifar")[0], _FirstChannels(), 0.4, x)


# -- serialization ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name,scope", [("resnet20_cifar", "all"), ("densenet40_cifar", "auto")])
def test_save_and_load_pruned(tmp_path, model_name: str, scope: str) -> None:
    model, x = make(model_name)
    _randomize_bn(model)
    prune_to_target(model, available_methods()["l1"](), 0.5, x, scope=scope)
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    fresh = timm.create_model(model_name, pretrained=False, num_classes=10)
    loaded = load_pruned(path, fresh)
    model.eval(), loaded.eval()
    inputs = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        assert torch.equal(model(inputs), loaded(inputs))
    assert count_macs(loaded, x).macs == count_macs(model, x).macs
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="save_pruned"):
        load_pruned(tmp_path / "plain.pt", fresh)


@pytest.mark.parametrize("seed", range(6))
def test_coarse_groups_do_not_overshoot(seed: int) -> None:
    """ResNet-8 has three internal groups and one 32x32-stage channel is ~2.4% of its MACs: the final
    removals must still land within the matched-budget band, half its cheapest channel (~0.22%), of the
    target (random scores make the rank order arbitrary)."""
    from prunebench.models import create_model
    from prunebench.recipe import ModelConfig

    torch.manual_seed(seed)
    model = create_model(ModelConfig(name="resnet8_cifar"), num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    dense = count_macs(model, x).macs
    result = prune_to_target(model, available_methods()["random"](), 0.5, x, reference_macs=dense, scope="internal")
    assert 0.5 <= result.macs_reduction <= 0.5 + result.tolerance
    assert 0.001 < result.tolerance < 0.003


# -- scope auto (issue 11) -----------------------------------------------------------------------------


def test_auto_scope_is_internal_where_it_reaches_the_target_and_all_otherwise(caplog) -> None:
    """ResNet-20's internal pairs reach 0.76 of its MACs at the default cap: a 0.5 target stays internal
    (the residual streams keep their width), a 0.8 target goes to scope all."""
    l1 = available_methods()["l1"]
    model, x = make("resnet20_cifar")
    with caplog.at_level(logging.INFO, logger="prunebench.budget"):
        res = prune_to_target(model, l1(), 0.5, x)
    assert "scope auto: internal" in caplog.text and model.conv1.out_channels == 16
    assert all(name.endswith("conv1") and name.startswith("layer") for name in res.removed)
    caplog.clear()
    model, x = make("resnet20_cifar")
    with caplog.at_level(logging.INFO, logger="prunebench.budget"):
        res = prune_to_target(model, l1(), 0.8, x)
    assert "scope auto: all" in caplog.text and "internal reaches only 0.76" in caplog.text
    assert 0.8 <= res.macs_reduction <= 0.8 + res.tolerance
    assert model.layer3[2].conv2.out_channels < 64  # a residual stream was cut
    with pytest.raises(UserError, match="max_layer_ratio"):
        prune_to_target(make("resnet20_cifar")[0], l1(), 0.8, x, scope="internal")


@pytest.mark.parametrize("method", ["l1", "thinet"])
def test_a_rounding_that_misses_the_band_falls_back_to_exact_widths(method: str, caplog) -> None:
    """ResNet-56 at 64 px, 30%, round_to 16: no rounded plan lands within the band, so the cut keeps exact
    widths and says so; the budget still matches (the global plan replans on a fresh cost model)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet56_cifar", num_classes=10).eval()
    x = torch.zeros(1, 3, 64, 64)
    m = available_methods()[method]()
    calib = Calibration(model=model, batches=[torch.randn(16, 3, 64, 64)]) if m.calibrated else None
    with caplog.at_level(logging.WARNING):
        res = prune_to_target(model, m, 0.3, x, scope="internal", round_to=16, calib=calib)
    assert any("round_to=16 leaves no plan within" in r.getMessage() for r in caplog.records)
    assert 0.3 <= res.macs_reduction <= 0.3 + res.tolerance + 1e-9
