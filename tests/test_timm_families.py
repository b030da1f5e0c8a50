"""Any timm CNN family (issue 11): every registered method prunes one representative of each family.

For every method, on one model per family (64x64 inputs, 32x32 for the CIFAR ResNet, 10 classes):
``prune_to_target`` at a 30% MACs reduction in scope ``auto`` lands within 0.01 of the target, the pruned
model runs forward and backward, and a saved pruned model reloads to identical outputs. Per family, a
group whose every member is zeroed is removed without changing the output (docs/methods.md, the
invariant). The squeeze-excitation families reach the target in scope ``internal`` (gates are not
merges), grouped convolutions keep every conv group at the same width, and a layer the engine does not
understand is left whole with a warning.

The whole matrix is ``slow`` (``make test-slow``); a representative subset -- grouped convolutions,
squeeze-excitation gates, mixed kernels -- runs in the default suite.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import MixedConv2d
from torch import Tensor, nn

import prunebench.models  # noqa: F401  (registers the CIFAR models into timm)
from prunebench.budget import MacsCostModel, group_caps
from prunebench.depgraph import channel_groups, is_depthwise
from prunebench.engine import cut, prune_to_target
from prunebench.groups import PrunableGroup, build_groups
from prunebench.measure import count_macs
from prunebench.method import Calibration
from prunebench.norms import member_slice
from prunebench.registry import available_methods
from prunebench.serialize import load_pruned, save_pruned

pytestmark = pytest.mark.unit

TARGET = 0.3
WITHIN = 0.01
# one representative per family; the first ones also run in the default suite
FAST = ["regnetx_002", "mobilenetv3_small_050", "mixnet_s"]
FAMILIES = FAST + [
    "resnet18",
    "resnext26ts",
    "regnety_002",
    "efficientnet_b0",
    "mobilenetv2_050",
    "ghostnet_100",
    "convnext_atto",
    "densenet121",
    "vgg11",
    "repvgg_a0",
    "dla34",
    "cspresnet50",
    "resnet20_cifar",
]
SE_FAMILIES = ["efficientnet_b0", "mobilenetv3_small_050", "mixnet_s", "regnety_002"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread from a fixed seed (conftest.one_thread)."""


def tier(name: str) -> list:
    return [] if name in FAST else [pytest.mark.slow]


def make(name: str) -> tuple[nn.Module, Tensor]:
    size = 32 if name.endswith("_cifar") else 64
    model = timm.create_model(name, pretrained=False, num_classes=10)
    _randomize_norms(model)
    return model, torch.randn(1, 3, size, size)


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics, so that outputs depend on every channel."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


def cases() -> list:
    return [
        pytest.param(method, model, id=f"{method}-{model}", marks=tier(model))
        for model in FAMILIES
        for method in available_methods()
    ]


@pytest.mark.parametrize("method_name,model_name", cases())
def test_every_method_prunes_every_family(tmp_path, method_name: str, model_name: str) -> None:
    model, x = make(model_name)
    cls = available_methods()[method_name]
    calib = None
    if cls.calibrated:
        model.eval()
        calib = Calibration(model=model, batches=[torch.randn(4, *x.shape[1:])])
    res = prune_to_target(model, cls(), TARGET, x, calib=calib)
    assert abs(res.macs_reduction - TARGET) <= WITHIN, res.macs_reduction
    assert sum(res.removed.values()) > 0
    for m in model.modules():  # grouped convolutions stay valid: every conv group keeps the same width
        if isinstance(m, nn.Conv2d):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, m
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups), m

    model.train()
    y = model(torch.randn(2, *x.shape[1:]))
    assert y.shape == (2, 10)
    y.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    loaded = load_pruned(path, timm.create_model(model_name, pretrained=False, num_classes=10))
    model.eval(), loaded.eval()
    inputs = torch.randn(2, *x.shape[1:])
    with torch.no_grad():
        assert torch.equal(model(inputs), loaded(inputs))


@pytest.mark.parametrize("model_name", [pytest.param(m, marks=tier(m)) for m in FAMILIES])
def test_a_zeroed_group_is_removed_without_changing_the_output(model_name: str) -> None:
    model, x = make(model_name)
    model.eval()
    graph, groups = build_groups(model, x, scope="all")
    group = _pick(groups)
    ch = group.size // 2
    with torch.no_grad():
        for member in group.members:
            for p, dim in member.params():
                sl = member_slice(member, p, dim)
                p.index_fill_(dim, sl.index.view(-1, sl.m)[ch], 0.0)
    inputs = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        before = model(inputs)
    cut(graph, groups, [torch.tensor([ch]) if g is group else torch.empty(0, dtype=torch.long) for g in groups])
    with torch.no_grad():
        after = model(inputs)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4), (group.name, (before - after).abs().max())


def _pick(groups: list[PrunableGroup]) -> PrunableGroup:
    """A group of several channels, internal where there is one and grouped or gated where there is one:
    the cases most likely to get the invariant wrong. Groups with a LayerNorm member are skipped (its
    statistics span the channels, so a zeroed channel still shifts them)."""
    ok = [g for g in groups if g.size > 1 and not any(isinstance(m.module, nn.LayerNorm) for m in g.members)]

    def rank(g: PrunableGroup) -> tuple:
        grouped = any(channel_groups(m.module) > 1 for m in g.members)
        return (g.coupled, not grouped, len(g.members) < 4)

    return min(ok, key=rank)


# -- squeeze-excitation gates ------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", [pytest.param(m, marks=tier(m)) for m in SE_FAMILIES])
def test_gates_are_not_merges(model_name: str) -> None:
    model, x = make(model_name)
    _, groups = build_groups(model, x, scope="all")
    internal = [g for g in groups if not g.coupled]
    report = count_macs(model, x)
    floor = MacsCostModel(model, internal, report).macs_for(np.asarray(group_caps(internal, 0.8)))
    assert 1 - floor / report.macs >= TARGET
    expand = ("se.conv_expand", "se.fc2")  # the gate's last conv: its out-channels are the gated channels
    gated = [g for g in internal if any(m.name.endswith(expand) and m.kind == "out" for m in g.members)]
    assert gated  # the expansion channels, with their SE gate, are internal groups now
    for g in gated:
        assert ".se." not in f".{g.name}" and not is_depthwise(g.root)  # rooted at the producing conv ...
        assert g.norm is not None and g.norm_layer() is g.norm  # ... which its normalization follows
        se = {(m.name.rsplit(".", 1)[-1], m.kind) for m in g.members if ".se." in f".{m.name}"}
        assert ("conv_reduce", "in") in se or ("fc1", "in") in se  # the gate follows the cut


# -- grouped convolutions ----------------------------------------------------------------------------


def test_grouped_conv_groups_are_units_of_one_channel_per_conv_group() -> None:
    model, x = make("regnetx_002")
    _, groups = build_groups(model, x, scope="internal")
    conv = model.s1.b1.conv2.conv  # 24 channels in 3 groups of 8
    assert conv.groups == 3 and conv.in_channels == 24
    g = next(g for g in groups if any(m.module is conv and m.kind == "in" for m in g.members))
    assert g.size == 8
    member = next(m for m in g.members if m.module is conv)
    assert member.idxs.shape == (8, 3)
    assert torch.equal(member.idxs.sort(1).values, torch.arange(24).view(3, 8).t())
    assert torch.equal(member.param_idxs(), torch.arange(8)[:, None])  # the weight's own in-channel index
    sl = member_slice(member, conv.weight, 1)
    torch.testing.assert_close(sl.sq_norms(), conv.weight.square().sum((0, 2, 3)))


# -- a layer the engine does not understand ------------------------------------------------------------


class GainConv(nn.Conv2d):
    """A conv with an extra per-filter parameter that torch-pruning's conv pruner would not resize."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.gain, self.bias, self.stride, self.padding)


class WithGain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = GainConv(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x))))))
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


def test_unknown_layer_is_left_whole_with_a_warning(caplog) -> None:
    model, x = WithGain(), torch.randn(1, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="prunebench.groups"):
        _, groups = build_groups(model, x, scope="all")
    roots = {g.name for g in groups}
    assert "c" in roots and "a" not in roots and "b" not in roots  # a's and b's groups touch b's filters
    assert any("GainConv" in r.getMessage() and "left whole" in r.getMessage() for r in caplog.records)
    res = prune_to_target(model, available_methods()["l1"](), 0.2, x, scope="all")
    assert res.macs_reduction >= 0.2 and model.b.gain.shape[0] == model.b.out_channels == 16
    assert model(x).shape == (1, 3)


# -- splits: mixed kernels ------------------------------------------------------------------------------


class Mixed(nn.Module):
    """conv_pw (10 channels) -> BN -> MixedConv2d (depthwise 3x3 / 5x5 / 7x7 on 4 / 3 / 3 channels) -> BN -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_pw = nn.Conv2d(6, 10, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv_dw = MixedConv2d(10, 10, kernel_size=[3, 5, 7], padding="", depthwise=True)
        self.bn2 = nn.BatchNorm2d(10)
        self.conv_pwl = nn.Conv2d(10, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv_pw(torch.relu(self.stem(x)))))
        x = torch.relu(self.bn2(self.conv_dw(x)))
        return self.fc(self.conv_pwl(x).mean((2, 3)))


def test_a_split_into_unequal_parts_gives_sub_groups_cut_in_the_right_part() -> None:
    torch.manual_seed(0)
    model = Mixed()
    _randomize_norms(model)
    model.eval()
    x = torch.randn(1, 3, 12, 12)
    assert model.conv_dw.splits == [4, 3, 3]
    graph, groups = build_groups(model, x, scope="internal")
    subs = sorted(g.name for g in groups if g.root is model.conv_pw)
    assert subs == ["conv_pw", "conv_pw[1]", "conv_pw[2]"]  # one per part of the split
    last = next(g for g in groups if g.name == "conv_pw[2]")
    assert [m.name for m in last.members if m.name.startswith("conv_dw")] == ["conv_dw.2"]
    ch = 1  # conv_pw's channel 8: the 7x7 part's second channel
    with torch.no_grad():
        for member in last.members:
            for p, dim in member.params():
                sl = member_slice(member, p, dim)
                p.index_fill_(dim, sl.index.view(-1, sl.m)[ch], 0.0)
        inputs = torch.randn(2, 3, 12, 12)
        before = model(inputs)
    cut(graph, groups, [torch.tensor([ch]) if g is last else torch.empty(0, dtype=torch.long) for g in groups])
    assert model.conv_dw.splits == [4, 3, 2] and model.conv_dw["2"].weight.shape[0] == 2
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), before, rtol=1e-5, atol=1e-5)
    # and two more pruning steps through the now unequal split, each on a freshly traced graph
    dense = count_macs(Mixed(), x).macs
    for target in (0.2, 0.4):
        res = prune_to_target(model, available_methods()["l1"](), target, x, reference_macs=dense)
        assert res.macs_reduction >= target
        assert model.conv_dw.splits == [c.in_channels for c in model.conv_dw.values()]
        assert model(inputs).shape == (2, 3)


# -- structures the engine must survive: prune what it can, leave the rest whole, never crash -------------

HARD = {
    "ecaresnet26t": "ECA: a conv along the channel axis of the pooled vector; the gate is cut out of the graph",
    "cs3darknet_s": "a concat whose input widths torch-pruning cannot infer (it raised TypeError)",
    "res2net50_14w_8s": "splits of sizes the model keeps (self.width): groups through them stay whole",
    "resnest14d": "split attention reshapes the channels into radix x C/radix (minutes of index mapping)",
    "dpn68": "dual paths slice the channels: the search for a group does not close (it ran past 3 minutes)",
    "tresnet_m": "BlurPool2d: F.conv2d with a buffer as weight, which the cut would not resize",
}


@pytest.mark.parametrize(
    "model_name", [pytest.param(m, marks=[] if m == "ecaresnet26t" else [pytest.mark.slow]) for m in HARD]
)
def test_hard_structures_prune_what_they_can(model_name: str) -> None:
    model, x = make(model_name)
    res = prune_to_target(model, available_methods()["l1"](), TARGET, x)
    assert abs(res.macs_reduction - TARGET) <= WITHIN
    assert res.timings["groups"] + res.timings["plan"] < 30  # seconds, not minutes (bench has the real budget)
    model.train()
    model(torch.randn(2, *x.shape[1:])).square().mean().backward()
    if model_name == "ecaresnet26t":
        eca = [m for n, m in model.named_modules() if n.endswith("se.conv")]
        assert eca and all(m.weight.shape[:2] == (1, 1) for m in eca)  # the gate's conv is untouched
