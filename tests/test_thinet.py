"""ThiNet: greedy selection, least-squares reconstruction, hook hygiene, and a whole-network prune.

The unit tests use hand-built groups on tiny models (a conv consumer and a linear consumer behind a
flatten), so they do not depend on ``build_groups``; the network tests use the shared engine.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, MixedConv2d, StdConv2d, create_conv2d
from timm.layers.conv2d_same import Conv2dSameExport
from torch import Tensor, nn

import prunebench.models  # noqa: F401  (registers the CIFAR models into timm)
from prunebench.engine import prune_to_target
from prunebench.errors import UserError
from prunebench.groups import GroupMember, PrunableGroup, build_groups
from prunebench.method import Calibration
from prunebench.methods.thinet import (
    ThiNet,
    ThiNetParams,
    _candidates,
    collect_terms,
    conv_terms,
    greedy_removal,
    least_squares_scale,
    row_quota,
)
from prunebench.registry import build_method, get_method

pytestmark = pytest.mark.unit

torch.set_num_threads(1)


@dataclass
class Case:
    """A tiny model, its one hand-built group, and how to reach the consumer's input."""

    model: nn.Module
    group: PrunableGroup
    consumer: nn.Module
    consumer_input: Callable[[Tensor], Tensor]
    channel_cols: Tensor  # [size, m]: consumer input columns of each group channel


def conv_case(seed: int = 0) -> Case:
    """``Conv(3->8)-BN-ReLU-Conv(8->6)``; the group is conv1's out-channels / conv2's in-channels."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
    model.eval()
    ar = torch.arange(8)[:, None]
    group = PrunableGroup(
        "0",
        model[0],
        8,
        [
            GroupMember("0", model[0], "out", ar),
            GroupMember("1", model[1], "out", ar),
            GroupMember("3", model[3], "in", ar),
        ],
    )
    return Case(model, group, model[3], lambda x: model[:3](x), ar)


def linear_case(seed: int = 0) -> Case:
    """``Conv(3->8)-BN-ReLU-Flatten-Linear(32->5)`` on 2x2 inputs: each channel owns 4 linear features."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5))
    model.eval()
    ar = torch.arange(8)[:, None]
    cols = torch.arange(32).view(8, 4)
    group = PrunableGroup(
        "0",
        model[0],
        8,
        [
            GroupMember("0", model[0], "out", ar),
            GroupMember("1", model[1], "out", ar),
            GroupMember("4", model[4], "in", cols),
        ],
    )
    return Case(model, group, model[4], lambda x: model[:4](x), cols)


CASES = {"conv": (conv_case, 8), "linear": (linear_case, 2)}  # builder, input side length


def batches(side: int, n: int, seed: int, bs: int = 8) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, side, side, generator=g) for _ in range(n)]


def consumer_error(case: Case, dense_consumer: nn.Module, remove: Tensor, held_out: list[Tensor]) -> float:
    """Squared error of the (possibly rescaled) consumer with ``remove`` cut, vs the dense consumer."""
    err = 0.0
    cols = case.channel_cols[remove].reshape(-1)
    with torch.no_grad():
        for x in held_out:
            inp = case.consumer_input(x)
            ref = dense_consumer(inp)
            cut = inp.clone()
            cut[:, cols] = 0  # zeroing an in-channel is what removing it does to the consumer's output
            err += float((case.consumer(cut) - ref).pow(2).sum())
    return err


def run_select(case: Case, n_remove: int, side: int, **params: object) -> Tensor:
    method = ThiNet(ThiNetParams(**params))
    return method.select(case.group, n_remove, Calibration(case.model, batches(side, 4, seed=1)))


# -- the contract ----------------------------------------------------------------------------------------
def test_registered_uniform_without_sparsity_training() -> None:
    cls = get_method("thinet")
    assert cls is ThiNet and cls.calibrated and not cls.has_sparsity_training()
    m = build_method({"name": "thinet", "samples_per_image": 5, "seed": 3})
    assert m.param_dict() == {"samples_per_image": 5, "max_rows": 4096, "reconstruct": True, "seed": 3}
    with pytest.raises(UserError, match="samples_per_image"):
        build_method({"name": "thinet", "samples_per_image": 0})
    with pytest.raises(UserError, match="no parameter 'samples'"):
        build_method({"name": "thinet", "samples": 5})


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("n_remove", [0, 1, 5, 8])
def test_select_returns_unique_valid_indices_and_removes_hooks(kind: str, n_remove: int) -> None:
    build, side = CASES[kind]
    case = build()
    remove = run_select(case, n_remove, side, seed=0)
    assert remove.dtype == torch.long and remove.shape == (n_remove,)
    assert remove.unique().numel() == n_remove
    assert bool(((remove >= 0) & (remove < case.group.size)).all())
    for mod in case.model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


def test_select_rejects_impossible_counts_and_keeps_training_flag() -> None:
    case = conv_case()
    with pytest.raises(ValueError, match="n_remove"):
        run_select(case, 9, 8)
    case.model.train()
    run_select(case, 2, 8)
    assert case.model.training  # calibration runs in eval mode and restores the caller's mode


def test_seed_makes_selection_and_rewrite_reproducible() -> None:
    a, b = conv_case(), conv_case()
    ra, rb = run_select(a, 4, 8, seed=7), run_select(b, 4, 8, seed=7)
    assert torch.equal(ra, rb)
    assert torch.equal(a.consumer.weight, b.consumer.weight)


# -- the algorithm -----------------------------------------------------------------------------------
def test_greedy_removal_is_vectorized_algorithm_1() -> None:
    """On columns whose sums are easy to reason about, each step adds the channel that keeps ||sum|| least."""
    X = torch.tensor([[1.0, -1.0, 0.1, 5.0], [1.0, -1.0, 0.0, 5.0]], dtype=torch.float64)
    # step 1: column 2 (norm 0.1); step 2: given acc = col 2, col 0 -> |1.1,1| vs col 1 -> |0.9,1|: col 1;
    # step 3: acc = (-0.9, -1): col 0 cancels it.
    assert greedy_removal(X, 3).tolist() == [2, 1, 0]


def test_row_quota_caps_rows_in_proportion() -> None:
    assert row_quota([8, 8], 10, 4096) == [80, 80]
    q = row_quota([8, 8, 4], 10, 100)
    assert sum(q) == 100 and q[0] == q[1] and q[2] < q[0]


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("weak", ["weights", "activations"])
def test_greedy_finds_the_known_unimportant_channels_and_beats_random(kind: str, weak: str) -> None:
    build, side = CASES[kind]
    case = build()
    answer = torch.tensor([1, 4, 6])
    with torch.no_grad():
        if weak == "weights":  # the consumer barely reads these channels
            case.consumer.weight[:, case.channel_cols[answer].reshape(-1)] *= 1e-3
        else:  # these channels are (almost) never active: ReLU after a very negative BN shift
            case.model[1].bias[answer] = -50.0
    dense_consumer = copy.deepcopy(case.consumer)
    remove = run_select(case, 3, side, seed=0, reconstruct=False)
    assert sorted(remove.tolist()) == answer.tolist()

    held_out = batches(side, 2, seed=99)
    greedy_err = consumer_error(case, dense_consumer, remove, held_out)
    g = torch.Generator().manual_seed(0)
    random_sets = [torch.randperm(8, generator=g)[:3] for _ in range(10)]
    random_errs = [
        consumer_error(case, dense_consumer, r, held_out) for r in random_sets if sorted(r.tolist()) != answer.tolist()
    ]
    assert random_errs and greedy_err < 0.01 * min(random_errs)


def duplicate_pairs(case: Case) -> None:
    """Make channel 4+j an exact copy of channel j, producer and consumer side alike."""
    with torch.no_grad():
        case.model[0].weight[4:] = case.model[0].weight[:4]
        case.model[0].bias[4:] = case.model[0].bias[:4]
        cols = case.channel_cols
        case.consumer.weight[:, cols[4:].reshape(-1)] = case.consumer.weight[:, cols[:4].reshape(-1)]


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dup", [False, True], ids=["random-init", "duplicated-pairs"])
def test_least_squares_rescaling_lowers_held_out_reconstruction_error(kind: str, seed: int, dup: bool) -> None:
    """Rescaling helps a little on a random net and a lot where kept channels can stand in for removed ones."""
    build, side = CASES[kind]
    plain, rescaled = build(seed), build(seed)
    if dup:
        duplicate_pairs(plain)
        duplicate_pairs(rescaled)
    dense_consumer = copy.deepcopy(plain.consumer)
    r_plain = run_select(plain, 4, side, seed=0, reconstruct=False)
    r_rescaled = run_select(rescaled, 4, side, seed=0, reconstruct=True)
    assert torch.equal(r_plain, r_rescaled)  # same samples, same greedy choice; only the rewrite differs
    assert torch.equal(plain.consumer.weight, dense_consumer.weight)  # reconstruct=False leaves weights alone
    assert not torch.equal(rescaled.consumer.weight, dense_consumer.weight)

    held_out = batches(side, 3, seed=99)  # not the calibration batches
    err_plain = consumer_error(plain, dense_consumer, r_plain, held_out)
    err_rescaled = consumer_error(rescaled, dense_consumer, r_rescaled, held_out)
    assert err_rescaled < (0.8 if dup else 1.0) * err_plain


def test_least_squares_recovers_the_exact_scale_of_a_duplicate() -> None:
    """Column 2 copies column 0: with 2 removed, keeping 0 at scale 2 reproduces the output exactly."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 4, generator=g, dtype=torch.float64)
    X[:, 2] = X[:, 0]
    w = least_squares_scale(X, torch.tensor([0, 1, 3]))
    assert torch.allclose(w, torch.tensor([2.0, 1.0, 1.0]), atol=1e-4)


def test_least_squares_keeps_dead_channels_at_scale_one() -> None:
    """An all-zero (never active) kept column is unidentifiable: the ridge keeps its scale at 1, not 0."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g, dtype=torch.float64)
    X[:, 3] = 0
    w = least_squares_scale(X, torch.tensor([0, 1, 3]))
    assert torch.isfinite(w).all() and w[2] == pytest.approx(1.0)


def chain(seed: int = 0) -> tuple[nn.Module, list[PrunableGroup]]:
    """``Conv-BN-ReLU-Conv-BN-ReLU-Conv`` and its two groups (conv1 -> conv2, conv2 -> conv3)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3),
    ).eval()
    ar = torch.arange(8)[:, None]
    return model, [
        PrunableGroup(
            f"g{i}", model[i], 8, [GroupMember(str(i), model[i], "out", ar), GroupMember(str(j), model[j], "in", ar)]
        )
        for i, j in [(0, 3), (3, 6)]
    ]


def test_statistics_come_from_one_pass_over_the_dense_model() -> None:
    """After attach, every group is sampled in one forward pass, before any group's rewrite."""
    model, groups = chain()
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda mod, inp: calls.append(1))
    try:
        method = ThiNet(ThiNetParams(seed=0))
        method.attach(model, groups)
        calib = Calibration(model, batches(8, 2, seed=1))
        for g in groups:
            method.select(g, 3, calib)
        assert len(calls) == 2  # two calibration batches, one pass for both groups
        method.attach(model, groups)  # after a cut the statistics must be gathered again
        method.select(groups[0], 3, calib)
        assert len(calls) == 4
    finally:
        handle.remove()


def test_selection_does_not_depend_on_the_order_groups_are_visited() -> None:
    """Group g0's rewrite of conv2 must not leak into g1's statistics (both come from the dense model)."""
    results = []
    for order in ([0, 1], [1, 0]):
        model, groups = chain()
        method = ThiNet(ThiNetParams(seed=0))
        method.attach(model, groups)
        calib = Calibration(model, batches(8, 2, seed=1))
        removed = {i: method.select(groups[i], 4, calib) for i in order}
        results.append((removed, [model[3].weight.clone(), model[6].weight.clone()]))
    (r0, w0), (r1, w1) = results
    assert all(torch.equal(r0[i], r1[i]) for i in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))


def test_grouped_consumer_falls_back_to_filter_l1_score() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8)).eval()
    ar = torch.arange(8)[:, None]
    members = [GroupMember("0", model[0], "out", ar), GroupMember("3", model[3], "in", ar)]
    group = PrunableGroup("0", model[0], 8, members)
    method = ThiNet()
    assert method.select(group, 2, Calibration(model, batches(8, 1, seed=1))) is None
    assert torch.allclose(method.score(group), model[0].weight.abs().sum((1, 2, 3)))


# -- whole networks, through the shared engine -----------------------------------------------------------
def small_network(name: str) -> nn.Module:
    """A CIFAR network of ``prunebench.models`` (random init)."""
    return timm.create_model(name, pretrained=False, num_classes=10).eval()


def prune_with_thinet(name: str, images: int, per_image: int) -> tuple[nn.Module, ThiNet, object, float]:
    """Prune ``name`` to 50% MACs through the engine; returns the model, method, result and seconds."""
    torch.manual_seed(0)
    model = small_network(name)
    method = build_method({"name": "thinet", "samples_per_image": per_image, "seed": 0})
    assert isinstance(method, ThiNet)
    calib = Calibration(model, batches(32, 2, seed=1, bs=images // 2))
    t = time.perf_counter()
    result = prune_to_target(model, method, 0.5, torch.randn(2, 3, 32, 32), calib=calib)
    return model, method, result, time.perf_counter() - t


def test_prunes_resnet20_to_half_the_macs_through_the_engine() -> None:
    model, method, result, _ = prune_with_thinet("resnet20_cifar", images=32, per_image=16)
    assert result.macs_reduction >= 0.5 - 1e-6
    # one fraction r for every group (the engine lets groups differ by one channel to hit the target)
    # after the cut the engine re-attaches the method to the pruned model: g.size is what remains
    n = torch.tensor([result.removed[g.name] for g in method.groups], dtype=torch.float64)
    size = n + torch.tensor([g.size for g in method.groups], dtype=torch.float64)
    assert bool((n > 0).all()) and float((n / size).max() - (n / size).min()) <= 1 / float(size.min())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    for mod in model.modules():
        assert not mod._forward_hooks


def test_resnet56_selection_plans_every_group() -> None:
    """27 groups, 4096 sampled rows each (64 images x 64 points): calibration pass + greedy + lstsq. Its time
    budget is the thinet_s target of `prunebench bench` (no wall-clock assert in a test)."""
    _, method, result, seconds = prune_with_thinet("resnet56_cifar", images=64, per_image=64)
    assert len(method.groups) == 27
    plan = result.timings["plan"]
    print(f"\nthinet resnet56_cifar -> 50% MACs: selection (plan) {plan:.2f} s, whole prune {seconds:.2f} s")


# -- padding: the sampled terms are the consumer's own output -------------------------------------------
def assert_terms_reproduce(conv: nn.Module, x: Tensor, points_per_image: int = 64) -> None:
    """The per-in-channel terms at sampled points sum to the module's own forward there (bias aside)."""
    with torch.no_grad():
        y = conv(x)
        img = torch.arange(x.shape[0]).repeat_interleave(points_per_image)
        got = conv_terms(conv, x, y, img, torch.Generator().manual_seed(0))
    assert got is not None
    terms, target = got
    assert terms.shape == (img.numel(), conv.in_channels)
    assert torch.allclose(terms.sum(1), target, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", [7, 8], ids=["odd", "even"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [3, 4])
@pytest.mark.parametrize("dilation", [1, 2])
def test_conv2d_same_terms_equal_its_forward(side: int, stride: int, kernel: int, dilation: int) -> None:
    """timm's Conv2dSame pads inside forward, asymmetrically, from the input size (tf_* models)."""
    torch.manual_seed(0)
    conv = Conv2dSame(5, 4, kernel, stride=stride, dilation=dilation, bias=True)
    assert_terms_reproduce(conv, torch.randn(2, 5, side, side + 3))  # odd and even sides in one input


@pytest.mark.parametrize("side", [7, 8], ids=["odd", "even"])
@pytest.mark.parametrize("stride", [1, 2])
def test_timm_create_conv2d_terms_equal_its_forward(side: int, stride: int) -> None:
    """Every padding create_conv2d hands out: tf 'same' (dynamic or static), pytorch-style '' and 'valid',
    and the export variant of Conv2dSame that builds a ZeroPad2d in its first forward."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, side, side)
    for padding in ("same", "", "valid"):
        for k in (1, 3, 5):
            assert_terms_reproduce(create_conv2d(6, 4, k, stride=stride, padding=padding, bias=True), x)
    assert_terms_reproduce(Conv2dSameExport(6, 4, 3, stride=stride), x)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_padding_modes_and_torch_same_terms_equal_the_forward(mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 8)
    assert_terms_reproduce(nn.Conv2d(5, 4, 3, stride=2, padding=(2, 1), padding_mode=mode), x)
    assert_terms_reproduce(nn.Conv2d(5, 4, 4, padding="same", dilation=(1, 2), padding_mode=mode), x)


def same_case(side: int, stride: int, seed: int = 0) -> Case:
    """``conv_case`` with a timm Conv2dSame(8->6, k=3) consumer of the given stride, on inputs of ``side``."""
    case = conv_case(seed)
    torch.manual_seed(seed)
    case.model[3] = Conv2dSame(8, 6, 3, stride=stride, bias=True)
    m = case.group.members[2]
    case.group.members[2] = GroupMember(m.name, case.model[3], "in", m.idxs)
    case.consumer = case.model[3]
    return case


@pytest.mark.parametrize("side", [7, 8], ids=["odd", "even"])
@pytest.mark.parametrize("stride", [1, 2])
def test_select_through_a_conv2d_same_consumer(side: int, stride: int, caplog: pytest.LogCaptureFixture) -> None:
    """The whole path with a dynamically padded consumer: terms used (no fallback, no warning), the greedy
    finds the channels the consumer barely reads, and least squares still rewrites the consumer."""
    case = same_case(side, stride)
    answer = torch.tensor([0, 3, 5])
    with torch.no_grad():
        case.consumer.weight[:, answer] *= 1e-3
    before = case.consumer.weight.clone()
    with caplog.at_level(logging.WARNING, logger="prunebench.methods.thinet"):
        remove = run_select(case, 3, side, seed=0)
    assert remove is not None and sorted(remove.tolist()) == answer.tolist()
    assert not caplog.records
    assert not torch.equal(case.consumer.weight, before)


def test_mixed_conv2d_children_are_ordinary_consumers() -> None:
    """MixnNet's MixedConv2d splits its input among convs of different kernels ('same' padding: Conv2dSame
    where stride 2 makes it dynamic). A group feeding one split is judged by that child, in its own
    (local) in-channel indices; the child's sampled terms equal its forward."""
    torch.manual_seed(0)
    mixed = MixedConv2d(8, 6, [3, 5], stride=2, padding="same")
    assert isinstance(mixed["1"], Conv2dSame)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), mixed).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        split = model[:3](x)[:, 4:]
    assert_terms_reproduce(mixed["1"], split)

    own, local = torch.arange(4, 8)[:, None], torch.arange(4)[:, None]  # producer channels 4-7 = child 1's 0-3
    group = PrunableGroup(
        "0",
        model[0],
        4,
        [
            GroupMember("0", model[0], "out", own),
            GroupMember("1", model[1], "out", own),
            GroupMember("3.1", mixed["1"], "in", local),
        ],
    )
    with torch.no_grad():
        mixed["1"].weight[:, [1, 2]] *= 1e-3  # producer channels 5 and 6 barely matter
    before0, before1 = mixed["0"].weight.clone(), mixed["1"].weight.clone()
    remove = ThiNet(ThiNetParams(seed=0)).select(group, 2, Calibration(model, batches(8, 2, seed=1)))
    assert remove is not None and sorted(remove.tolist()) == [1, 2]
    assert torch.equal(mixed["0"].weight, before0) and not torch.equal(mixed["1"].weight, before1)


class _OddPadConv(nn.Conv2d):
    """A conv whose forward pads in a way ThiNet does not know (one extra row and column, top-left)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (1, 0, 1, 0)))


@pytest.mark.parametrize("kind", ["weight-standardized", "unknown-padding"])
def test_consumer_whose_terms_do_not_match_falls_back_with_a_warning(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Terms that do not sum to the module's output (timm's StdConv2d standardizes its weight in forward; a
    conv that pads on its own) are not used: one warning, select returns None, the engine scores by L1."""
    case = conv_case()
    consumer = StdConv2d(8, 6, 3, padding=1) if kind == "weight-standardized" else _OddPadConv(8, 6, 3, padding=1)
    case.model[3] = consumer
    m = case.group.members[2]
    case.group.members[2] = GroupMember(m.name, consumer, "in", m.idxs)
    before = consumer.weight.clone()
    method = ThiNet(ThiNetParams(seed=0))
    with caplog.at_level(logging.WARNING, logger="prunebench.methods.thinet"):
        assert method.select(case.group, 2, Calibration(case.model, batches(8, 2, seed=1))) is None
    assert len(caplog.records) == 1 and "3 (" in caplog.records[0].getMessage()
    assert torch.equal(consumer.weight, before)  # no rescaling from unusable terms
    assert torch.allclose(method.score(case.group), case.model[0].weight.abs().sum((1, 2, 3)))
    for mod in case.model.modules():
        assert not mod._forward_hooks


class _GatedBlock(nn.Module):
    """conv1-BN-ReLU, a squeeze-excitation gate on it, then conv2: the group of conv1's channels has two
    consumers, the gate's reduce conv (on the pooled 1x1 input) and conv2 (the main path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.reduce, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn(self.conv1(x)))
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.conv2(x * gate)


def test_se_gated_group_is_judged_by_the_main_path_consumer() -> None:
    torch.manual_seed(0)
    model = _GatedBlock().eval()
    ar = torch.arange(8)[:, None]
    members = [
        GroupMember("conv1", model.conv1, "out", ar),
        GroupMember("bn", model.bn, "out", ar),
        GroupMember("expand", model.expand, "out", ar),
        GroupMember("reduce", model.reduce, "in", ar),  # listed first: "first conv" would pick the gate
        GroupMember("conv2", model.conv2, "in", ar),
    ]
    group = PrunableGroup("conv1", model.conv1, 8, members)
    with torch.no_grad():
        model.conv2.weight[:, [2, 7]] *= 1e-3  # the main path barely reads channels 2 and 7
    reduce_before, conv2_before = model.reduce.weight.clone(), model.conv2.weight.clone()
    remove = ThiNet(ThiNetParams(seed=0)).select(group, 2, Calibration(model, batches(8, 2, seed=1)))
    assert remove is not None and sorted(remove.tolist()) == [2, 7]
    assert torch.equal(model.reduce.weight, reduce_before) and not torch.equal(model.conv2.weight, conv2_before)


@pytest.mark.parametrize("name", ["tf_efficientnetv2_b0", "tf_mixnet_s"])
def test_tf_models_every_consumer_reproduces_its_output(name: str, caplog: pytest.LogCaptureFixture) -> None:
    """On real timm networks with TF 'same' padding (64 px, scope all): every group with a consumer ThiNet
    handles gets terms, and every consumer's terms match its output (no warning) -- including a stride-2
    Conv2dSame (EfficientNetV2's fused blocks) and the split children of MixNet's MixedConv2d."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    _, groups = build_groups(model, torch.randn(2, 3, 64, 64), scope="all")
    calib = Calibration(model, batches(64, 2, seed=1, bs=4))
    with caplog.at_level(logging.WARNING, logger="prunebench.methods.thinet"):
        judged = collect_terms(groups, calib, ThiNetParams(), torch.Generator().manual_seed(0))
    assert not caplog.records  # every candidate consumer was checked against its output, not only the judged
    assert all(judged[g] is not None for g in groups if _candidates(g))
    checked = {m.module for g in groups for m in _candidates(g)}
    if name == "tf_efficientnetv2_b0":
        assert any(isinstance(c, Conv2dSame) and c.stride == (2, 2) for c in checked)
    else:
        children = {c for m in model.modules() if isinstance(m, MixedConv2d) for c in m.values()}
        assert checked & children
