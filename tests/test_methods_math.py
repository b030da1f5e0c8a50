"""The mathematics of the regularizing methods: oicsr, group_lasso and slimming.

Every quantity is checked against a hand computation with explicit loops over channels (loops are fine
here, not in the methods). Groups come from a hand-built helper for a tiny ``Conv(3->4)-BN-ReLU-Conv(4->5)``
model and, once it exists, from ``prunebench.groups.build_groups`` too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

import prunebench.groups as pg
from prunebench.errors import UserError
from prunebench.groups import GroupMember, PrunableGroup
from prunebench.method import PruningMethod
from prunebench.methods._group_sparsity import growl_weights, owl_prox
from prunebench.norms import group_slices
from prunebench.registry import available_methods, build_method

pytestmark = pytest.mark.unit

torch.set_num_threads(1)

MINE = ("oicsr", "group_lasso", "slimming")


# -- models and groups ---------------------------------------------------------------------------
class Tiny(nn.Module):
    """A 1x1 stem, then Conv(3->4)-BN-ReLU-Conv(4->5): one prunable group, conv1's out-channels.

    The stem is there because ``build_groups`` never prunes the first conv of a network.
    """

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 5, 3, padding=1)
        with torch.no_grad():  # non-trivial BN parameters so that gamma and beta count in the norms
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.relu(self.bn(self.conv1(self.stem(x)))))


def _ids(n: int) -> Tensor:
    return torch.arange(n)[:, None]


def out_in_group(
    root: nn.Module, norm: nn.Module | None, consumer: nn.Module, size: int, consumer_idxs: Tensor | None = None
) -> PrunableGroup:
    """A hand-built group: ``root``'s out-channels, its norm layer and ``consumer``'s in-channels."""
    members = [GroupMember("root", root, "out", _ids(size))]
    if norm is not None:
        members.append(GroupMember("norm", norm, "out", _ids(size)))
    members.append(GroupMember("consumer", consumer, "in", _ids(size) if consumer_idxs is None else consumer_idxs))
    return PrunableGroup("root", root, size, members)


def hand_groups(model: Tiny) -> list[PrunableGroup]:
    return [out_in_group(model.conv1, model.bn, model.conv2, 4)]


def library_groups(model: Tiny) -> list[PrunableGroup]:
    _, groups = pg.build_groups(model, torch.randn(1, 3, 8, 8), scope="internal", never_prune=[model.stem, model.conv2])
    assert len(groups) == 1 and groups[0].root is model.conv1 and groups[0].size == 4
    return groups


Setup = tuple[Tiny, list[PrunableGroup]]
BUILDERS: dict[str, Callable[[Tiny], list[PrunableGroup]]] = {"hand": hand_groups, "build_groups": library_groups}


@pytest.fixture(params=sorted(BUILDERS))
def setup(request: pytest.FixtureRequest) -> Setup:
    torch.manual_seed(0)
    model = Tiny()
    return model, BUILDERS[request.param](model)


def make(name: str, **params: object) -> PruningMethod:
    return build_method({"name": name, **params})


def attached(name: str, model: nn.Module, groups: list[PrunableGroup], **params: object) -> PruningMethod:
    method = make(name, **params)
    method.attach(model, groups)
    return method


# -- hand computations (explicit loops) ----------------------------------------------------------
def hand_norms(model: Tiny, side: str) -> Tensor:
    """||G_i||_2 with G_i = [conv1[i], gamma_i, beta_i] (+ conv2[:, i] for side 'all')."""
    out = []
    for i in range(4):
        sq = model.conv1.weight[i].pow(2).sum() + model.bn.weight[i] ** 2 + model.bn.bias[i] ** 2
        if side == "all":
            sq = sq + model.conv2.weight[:, i].pow(2).sum()
        out.append(sq.sqrt())
    return torch.stack(out).detach()


def slices(model: Tiny, i: int) -> list[Tensor]:
    """Every tensor slice of out-in-channel i."""
    return [model.conv1.weight[i], model.bn.weight[i], model.bn.bias[i], model.conv2.weight[:, i]]


def pava_nonincreasing(z: list[float]) -> list[float]:
    """Reference isotonic regression onto the non-increasing cone (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in z:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: list[float] = []
    for s, c in blocks:
        out += [s / c] * int(c)
    return out


def owl_prox_reference(v: list[float], w: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda k: -v[k])
    fitted = pava_nonincreasing([v[k] - w[r] for r, k in enumerate(order)])
    out = [0.0] * len(v)
    for r, k in enumerate(order):
        out[k] = max(fitted[r], 0.0)
    return out


# -- registry ------------------------------------------------------------------------------------
def test_registry_lists_the_methods_with_descriptions_and_citations() -> None:
    methods = available_methods()
    for name in MINE:
        cls = methods[name]
        assert cls.name == name
        assert cls.description and "\n" not in cls.description
        assert cls.has_sparsity_training()
        assert not cls.calibrated
    citations = {"oicsr": "arXiv:1905.11664", "group_lasso": "Wen et al.", "slimming": "Liu et al."}
    for name, cite in citations.items():
        doc = sys.modules[methods[name].__module__].__doc__ or ""
        assert cite in doc and "Choices the paper leaves open" in doc
    assert methods["oicsr"].normalize == methods["group_lasso"].normalize == "max"
    assert methods["slimming"].normalize is None


def test_params_validate_and_alias_lambda() -> None:
    m = make("oicsr", **{"lambda": 1e-3, "variant": "growl", "growl_min": 0.25, "mode": "proximal"})
    assert m.param_dict() == {"lambda": 1e-3, "mode": "proximal", "variant": "growl", "growl_min": 0.25}
    assert make("slimming").param_dict()["lambda"] == 1e-3
    assert make("group_lasso").param_dict() == {"lambda": 2e-3, "mode": "loss", "score": "group"}
    with pytest.raises(UserError, match="variant"):
        make("oicsr", variant="owl")
    with pytest.raises(UserError, match="growl_min"):
        make("oicsr", growl_min=1.5)
    with pytest.raises(UserError, match="lambda"):
        make("group_lasso", **{"lambda": -1.0})
    with pytest.raises(UserError, match="variant"):
        make("group_lasso", variant="growl")  # group lasso has no GrOWL variant


# -- penalties -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "side"), [("oicsr", "all"), ("group_lasso", "root")])
def test_penalty_is_the_hand_computed_l21_norm(setup: Setup, name: str, side: str) -> None:
    model, groups = setup
    lam = 0.3
    penalty = attached(name, model, groups, **{"lambda": lam}).penalty()
    assert penalty is not None and penalty.requires_grad
    expected = lam * hand_norms(model, side).sum()
    torch.testing.assert_close(penalty.detach(), expected, rtol=1e-5, atol=1e-6)


def test_penalty_is_none_in_proximal_mode_and_at_zero_lambda(setup: Setup) -> None:
    model, groups = setup
    assert attached("oicsr", model, groups, mode="proximal").penalty() is None
    assert attached("oicsr", model, groups, **{"lambda": 0.0}).penalty() is None


def test_penalty_with_a_flatten_consumer_owns_several_features_per_channel() -> None:
    """Conv(3->4)-BN -> flatten -> Linear(4*2*2 -> 5): channel c owns features 4c..4c+3 of the Linear."""
    torch.manual_seed(1)
    conv, bn, fc = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Linear(16, 5)
    group = out_in_group(conv, bn, fc, 4, consumer_idxs=torch.arange(16).view(4, 4))
    method = attached("oicsr", nn.Sequential(conv, bn, fc), [group], **{"lambda": 1.0})
    energy = torch.stack(
        [
            conv.weight[c].pow(2).sum()
            + bn.weight[c] ** 2
            + bn.bias[c] ** 2
            + fc.weight[:, 4 * c : 4 * c + 4].pow(2).sum()
            for c in range(4)
        ]
    ).detach()
    torch.testing.assert_close(method.penalty().detach(), energy.sqrt().sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.score(group), energy, rtol=1e-5, atol=1e-6)


def test_penalty_sums_over_overlapping_groups_of_a_chain() -> None:
    """conv1-bn1-conv2-bn2-conv3: conv2 holds group 1's in-channels and group 2's filters."""
    torch.manual_seed(2)
    c1, b1 = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
    c2, b2 = nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6)
    c3 = nn.Conv2d(6, 2, 1)
    groups = [out_in_group(c1, b1, c2, 4), out_in_group(c2, b2, c3, 6)]
    method = attached("oicsr", nn.Sequential(c1, b1, c2, b2, c3), groups, **{"lambda": 1.0})
    # BN at init: gamma = 1, beta = 0
    expected = sum((c1.weight[i].pow(2).sum() + 1 + c2.weight[:, i].pow(2).sum()).sqrt() for i in range(4))
    expected = expected + sum((c2.weight[j].pow(2).sum() + 1 + c3.weight[:, j].pow(2).sum()).sqrt() for j in range(6))
    torch.testing.assert_close(method.penalty().detach(), expected.detach(), rtol=1e-5, atol=1e-6)


# -- GrOWL ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7])
@pytest.mark.parametrize("w_min", [0.0, 0.3, 1.0])
def test_growl_weights_are_non_increasing_from_one_to_w_min(n: int, w_min: float) -> None:
    w = growl_weights(n, w_min)
    assert w.shape == (n,) and w[0] == 1.0
    assert bool((w[1:] <= w[:-1]).all())
    if n > 1:
        assert w[-1].item() == pytest.approx(w_min)
        torch.testing.assert_close(w[:-1] - w[1:], torch.full((n - 1,), (1 - w_min) / (n - 1)))  # linear (OSCAR)


@pytest.mark.parametrize("w_min", [0.0, 0.4, 1.0])
def test_growl_penalty_is_the_sorted_weighted_sum_and_bounded(setup: Setup, w_min: float) -> None:
    model, groups = setup
    lam = 0.2
    penalty = attached("oicsr", model, groups, **{"lambda": lam}, variant="growl", growl_min=w_min).penalty()
    norms = hand_norms(model, "all")
    ranked = sorted(norms.tolist(), reverse=True)
    w = [1 - (1 - w_min) * k / 3 for k in range(4)]
    expected = lam * sum(wk * nk for wk, nk in zip(w, ranked))
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    assert penalty.item() >= lam * w_min * norms.sum().item() - 1e-6
    assert penalty.item() <= lam * norms.sum().item() + 1e-6
    if w_min == 1.0:  # GrOWL with flat weights is the group lasso
        gl = attached("oicsr", model, groups, **{"lambda": lam}).penalty()
        assert penalty.item() == pytest.approx(gl.item(), rel=1e-6)


def test_owl_prox_matches_pool_adjacent_violators() -> None:
    gen = torch.Generator().manual_seed(3)
    for n in (1, 2, 5, 17, 40):
        for _ in range(5):
            v = torch.rand(n, generator=gen, dtype=torch.float64) * 2
            if n > 3:
                v[1] = v[2]  # ties
            w = torch.sort(torch.rand(n, generator=gen, dtype=torch.float64), descending=True).values
            got = owl_prox(v, w)
            want = torch.tensor(owl_prox_reference(v.tolist(), w.tolist()), dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    v = torch.tensor([3.0, 0.5, 2.0, 0.1])
    torch.testing.assert_close(owl_prox(v, torch.full((4,), 0.4)), (v - 0.4).clamp_min(0))  # flat w: soft-threshold


# -- importance ----------------------------------------------------------------------------------
def test_oicsr_importance_is_the_group_energy_and_sees_the_consumer(setup: Setup) -> None:
    model, groups = setup
    oicsr, gl = attached("oicsr", model, groups), attached("group_lasso", model, groups)
    (g,) = groups
    s_oicsr, s_gl = oicsr.score(g), gl.score(g)
    torch.testing.assert_close(s_oicsr, hand_norms(model, "all") ** 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_oicsr, group_slices(g, "all").sq_norms().detach(), rtol=1e-5, atol=1e-6)
    # group lasso scores the group it regularizes, [filter, gamma, beta]; score: filter is the filter-only ablation
    torch.testing.assert_close(s_gl, hand_norms(model, "root"), rtol=1e-5, atol=1e-6)
    filt = attached("group_lasso", model, groups, score="filter")
    torch.testing.assert_close(filt.score(g), model.conv1.weight.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)
    assert s_oicsr.shape == s_gl.shape == (4,) and not s_oicsr.requires_grad
    with torch.no_grad():
        model.conv2.weight[:, 2] *= 3.0  # only the consumer's in-channel 2 changes
    after_oicsr, after_gl = oicsr.score(g), gl.score(g)
    assert after_oicsr[2] > s_oicsr[2]
    torch.testing.assert_close(after_oicsr[[0, 1, 3]], s_oicsr[[0, 1, 3]])
    assert torch.equal(after_gl, s_gl)


def test_slimming_scores_abs_gamma_and_falls_back_to_filter_l1(setup: Setup) -> None:
    model, groups = setup
    method = attached("slimming", model, groups)
    torch.testing.assert_close(method.score(groups[0]), model.bn.weight.detach().abs())
    conv = nn.Conv2d(3, 4, 3)
    no_bn = out_in_group(conv, None, nn.Conv2d(4, 2, 1), 4)
    torch.testing.assert_close(method.score(no_bn), conv.weight.detach().abs().flatten(1).sum(1))


# -- proximal steps ------------------------------------------------------------------------------
def _shrink_channels(model: Tiny, chans: list[int], by: float) -> None:
    with torch.no_grad():
        for i in chans:
            for s in slices(model, i):
                s.mul_(by)


@pytest.mark.parametrize("variant", ["gl", "growl"])
def test_proximal_step_with_large_lambda_zeroes_every_slice(setup: Setup, variant: str) -> None:
    model, groups = setup
    bias = model.conv2.bias.detach().clone()
    method = attached("oicsr", model, groups, **{"lambda": 1e4}, mode="proximal", variant=variant)
    method.after_step(0.1)
    for i in range(4):
        for s in slices(model, i):
            assert torch.count_nonzero(s) == 0
    assert torch.equal(model.conv2.bias.detach(), bias)  # not part of any group


def test_proximal_step_zeroes_small_groups_and_scales_the_others_exactly(setup: Setup) -> None:
    model, groups = setup
    _shrink_channels(model, [0, 2], 1e-3)
    norms = hand_norms(model, "all")
    lr, lam = 0.1, 0.5  # threshold lr*lam = 0.05: above channels 0 and 2, below 1 and 3
    t = lr * lam
    assert norms[[0, 2]].max() < t < norms[[1, 3]].min()
    before = [[s.detach().clone() for s in slices(model, i)] for i in range(4)]
    attached("oicsr", model, groups, **{"lambda": lam}, mode="proximal").after_step(lr)
    for i in range(4):
        factor = max(0.0, 1 - t / norms[i].item())
        for old, new in zip(before[i], slices(model, i)):
            if i in (0, 2):
                assert torch.count_nonzero(new) == 0  # exact zeros, whole group
            else:
                torch.testing.assert_close(new.detach(), old * factor, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hand_norms(model, "all")[[1, 3]], norms[[1, 3]] - t, rtol=1e-5, atol=1e-7)


def test_group_lasso_proximal_step_leaves_the_consumer_alone(setup: Setup) -> None:
    model, groups = setup
    _shrink_channels(model, [1], 1e-3)
    consumer = model.conv2.weight.detach().clone()
    norms = hand_norms(model, "root")
    lr, lam = 0.1, 0.5
    before = [model.conv1.weight[3].detach().clone(), model.bn.weight[3].item(), model.bn.bias[3].item()]
    attached("group_lasso", model, groups, **{"lambda": lam}, mode="proximal").after_step(lr)
    assert torch.equal(model.conv2.weight.detach(), consumer)
    for s in (model.conv1.weight[1], model.bn.weight[1], model.bn.bias[1]):
        assert torch.count_nonzero(s) == 0
    factor = 1 - lr * lam / norms[3].item()
    torch.testing.assert_close(model.conv1.weight[3].detach(), before[0] * factor)
    assert model.bn.weight[3].item() == pytest.approx(before[1] * factor, rel=1e-5)
    assert model.bn.bias[3].item() == pytest.approx(before[2] * factor, rel=1e-5)


def test_growl_proximal_step_applies_the_owl_prox_to_group_norms(setup: Setup) -> None:
    model, groups = setup
    _shrink_channels(model, [3], 0.05)
    norms = hand_norms(model, "all")
    lr, lam, w_min = 0.1, 1.0, 0.2
    w = [lr * lam * (1 - (1 - w_min) * k / 3) for k in range(4)]
    want = torch.tensor(owl_prox_reference(norms.tolist(), w))
    method = attached("oicsr", model, groups, **{"lambda": lam}, mode="proximal", variant="growl", growl_min=w_min)
    method.after_step(lr)
    torch.testing.assert_close(hand_norms(model, "all"), want, rtol=1e-5, atol=1e-6)


def test_a_zeroed_out_in_group_can_be_removed_without_changing_the_output(setup: Setup) -> None:
    """docs/methods.md's invariant ("Prunable groups"), reached through OICSR's proximal step (in eval and train mode)."""
    model, groups = setup
    _shrink_channels(model, [1], 1e-3)
    attached("oicsr", model, groups, **{"lambda": 0.5}, mode="proximal").after_step(0.1)
    keep = [0, 2, 3]
    small = Tiny(width=3)
    with torch.no_grad():
        small.stem.load_state_dict(model.stem.state_dict())
        small.conv1.weight.copy_(model.conv1.weight[keep])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(small.bn, name).copy_(getattr(model.bn, name)[keep])
        small.conv2.weight.copy_(model.conv2.weight[:, keep])
        small.conv2.bias.copy_(model.conv2.bias)
    x = torch.randn(2, 3, 6, 6)
    for train in (False, True):
        model.train(train)
        small.train(train)
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


# -- slimming ------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", ["none", "zero"])
def test_slimming_moves_gamma_toward_zero_by_exactly_lr_lambda(setup: Setup, grad: str) -> None:
    model, groups = setup
    lr, lam = 0.1, 1e-2
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.5, -0.3, 0.0, 2.0]))
    gamma0 = model.bn.weight.detach().clone()
    method = attached("slimming", model, groups, **{"lambda": lam})
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    opt.zero_grad(set_to_none=True)
    if grad == "zero":  # a loss whose gradient is exactly zero
        (0.0 * model(torch.randn(1, 3, 4, 4)).sum()).backward()
    method.after_backward()
    opt.step()
    torch.testing.assert_close(model.bn.weight.detach(), gamma0 - lr * lam * gamma0.sign(), rtol=0, atol=1e-7)
    moved = gamma0.abs() - model.bn.weight.detach().abs()
    torch.testing.assert_close(moved[[0, 1, 3]], torch.full((3,), lr * lam), rtol=0, atol=1e-7)
    assert model.bn.weight[2].item() == 0.0  # sign(0) = 0: a zero gamma stays put


def test_slimming_leaves_norm_layers_outside_prunable_groups_alone() -> None:
    torch.manual_seed(0)
    model = Tiny()
    extra = nn.BatchNorm2d(5)  # e.g. a BN on a residual stream, never pruned under scope internal
    method = attached("slimming", nn.Sequential(model, extra), hand_groups(model), **{"lambda": 1e-2})
    method.after_backward()
    assert extra.weight.grad is None
    torch.testing.assert_close(model.bn.weight.grad, 1e-2 * model.bn.weight.detach().sign())


# -- gradients and device syncs ------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {"name": "oicsr"},
        {"name": "oicsr", "variant": "growl", "growl_min": 0.0},
        {"name": "group_lasso"},
    ],
)
def test_penalty_gradient_is_finite_at_an_exactly_zero_group(setup: Setup, config: dict) -> None:
    model, groups = setup
    with torch.no_grad():
        for s in slices(model, 1):
            s.zero_()
    method = build_method({**config, "lambda": 1.0})
    method.attach(model, groups)
    method.penalty().backward()
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    for s in (model.conv1.weight.grad[1], model.bn.weight.grad[1], model.bn.bias.grad[1]):
        assert torch.count_nonzero(s) == 0  # the subgradient at 0 we pick is 0


@contextmanager
def no_host_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``.item()``, ``.tolist()`` and Python conversions of tensors raise inside the block."""

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("a hook synchronised with the device")

    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, attr, boom)
        yield


HOOK_CONFIGS = [
    {"name": "oicsr"},
    {"name": "oicsr", "mode": "proximal"},
    {"name": "oicsr", "variant": "growl"},
    {"name": "oicsr", "variant": "growl", "mode": "proximal"},
    {"name": "group_lasso"},
    {"name": "group_lasso", "mode": "proximal"},
    {"name": "slimming"},
] + [{"name": n} for n in available_methods() if n not in MINE]


@pytest.mark.parametrize("config", HOOK_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_hooks_run_a_training_step_without_host_sync(
    setup: Setup, config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, groups = setup
    method = build_method(dict(config))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    method.attach(model, groups)
    loss = model(torch.randn(2, 3, 6, 6)).square().mean()
    with no_host_sync(monkeypatch):
        penalty = method.penalty()
        total = loss if penalty is None else loss + penalty
    total.backward()
    with no_host_sync(monkeypatch):
        method.after_backward()
    opt.step()
    with no_host_sync(monkeypatch):
        method.after_step(0.1)
        method.on_epoch_end(0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", HOOK_CONFIGS[:7], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_hooks_do_not_synchronise_a_cuda_device(config: dict) -> None:
    model = Tiny().cuda()
    method = build_method(dict(config))
    method.attach(model, hand_groups(model))
    loss = model(torch.randn(2, 3, 6, 6, device="cuda")).square().mean()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        penalty = method.penalty()
        total = loss if penalty is None else loss + penalty
    finally:
        torch.cuda.set_sync_debug_mode(0)
    total.backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        method.after_backward()
        method.after_step(0.1)
        method.on_epoch_end(0)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# -- grouped convolutions (issue 11) ---------------------------------------------------------------
class GroupedTiny(nn.Module):
    """stem -> Conv(3->8)-BN-ReLU -> grouped Conv(8->8, groups=2)-BN-ReLU -> Conv(8->5): the grouped conv's
    weight has 8/2 = 4 in-channels, so conv1's channel c and c+4 reach the same weight column."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 5, 1)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.normal_()
                bn.bias.normal_()

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(self.stem(x))))
        return self.conv3(torch.relu(self.bn2(self.conv2(x))))


def grouped_setup() -> tuple[GroupedTiny, PrunableGroup, PrunableGroup]:
    torch.manual_seed(0)
    model = GroupedTiny()
    _, groups = pg.build_groups(model, torch.randn(1, 3, 6, 6), scope="internal", never_prune=[model.conv3])
    by_root = {g.root: g for g in groups}
    return model, by_root[model.conv1], by_root[model.conv2]


def test_grouped_conv_groups_are_units_and_their_norms_index_the_grouped_weight() -> None:
    """Unit u of conv1's group is channels u and u + 4 (one per conv2 group): ||G_u||^2 is conv1's two
    filters, their gammas and betas and conv2's weight column u (every output row of both conv groups)."""
    model, g1, g2 = grouped_setup()
    assert g1.size == g2.size == 4
    energy = group_slices(g1, "all").sq_norms().detach()
    hand = torch.stack(
        [
            sum(
                model.conv1.weight[c].pow(2).sum() + model.bn1.weight[c] ** 2 + model.bn1.bias[c] ** 2
                for c in (u, u + 4)
            )
            + model.conv2.weight[:, u].pow(2).sum()
            for u in range(4)
        ]
    ).detach()
    torch.testing.assert_close(energy, hand, rtol=1e-5, atol=1e-6)
    # conv2's own group: its filters u and u + 4 (one per conv group), bn2, and conv3's in-channels u, u + 4
    energy2 = group_slices(g2, "all").sq_norms().detach()
    hand2 = torch.stack(
        [
            sum(
                model.conv2.weight[c].pow(2).sum()
                + model.bn2.weight[c] ** 2
                + model.bn2.bias[c] ** 2
                + model.conv3.weight[:, c].pow(2).sum()
                for c in (u, u + 4)
            )
            for u in range(4)
        ]
    ).detach()
    torch.testing.assert_close(energy2, hand2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["oicsr", "group_lasso", "slimming", "l1", "random"])
def test_methods_score_and_regularize_grouped_units(name: str) -> None:
    """Every method gives one score per unit, its penalty and proximal step run, and the cut keeps both
    conv groups of the same width."""
    from prunebench.engine import prune_to_target

    model, g1, g2 = grouped_setup()
    if name in ("oicsr", "group_lasso"):
        assert attached(name, model, [g1, g2]).penalty() is not None
        attached(name, model, [g1, g2], mode="proximal").after_step(0.01)
    scores = make(name).score(g1)
    assert scores.shape == (4,)
    if name == "slimming":  # the mean |gamma| of the unit's two channels
        torch.testing.assert_close(scores, (model.bn1.weight.abs()[:4] + model.bn1.weight.abs()[4:]).detach() / 2)
    x = torch.randn(1, 3, 6, 6)
    res = prune_to_target(model, make(name), 0.3, x, scope="internal", ignored_layers=["conv3"])
    assert res.macs_reduction >= 0.3
    assert model.conv2.in_channels % 2 == 0 and model.conv2.out_channels % 2 == 0
    assert model.conv2.weight.shape[1] == model.conv2.in_channels // 2
    assert res.removed["conv1"] % 2 == 0 and res.removed["conv1"] == 8 - model.conv1.out_channels
    assert model(x).shape[1] == 5


def test_a_zeroed_grouped_unit_is_removed_without_changing_the_output() -> None:
    from prunebench.engine import cut

    torch.manual_seed(0)
    model = GroupedTiny().eval()
    x = torch.randn(1, 3, 6, 6)
    graph, groups = pg.build_groups(model, x, scope="internal", never_prune=[model.conv3])
    g = next(g for g in groups if g.root is model.conv1)
    with torch.no_grad():
        group_slices(g, "all").scale_(torch.tensor([1.0, 0.0, 1.0, 1.0]))  # unit 1: channels 1 and 5
        inputs = torch.randn(2, 3, 6, 6)
        before = model(inputs)
    cut(graph, groups, [torch.tensor([1]) if h is g else torch.empty(0, dtype=torch.long) for h in groups])
    assert model.conv1.out_channels == 6 and model.conv2.in_channels == 6 and model.conv2.groups == 2
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), before, rtol=1e-5, atol=1e-5)
