"""CIFAR models in timm's registry: shapes, sizes, errors, and how torch-pruning sees them."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from prunebench import weights
from prunebench.errors import UserError
from prunebench.groups import classifier_and_stem, customized_pruners
from prunebench.models import (
    CIFAR_MODELS,
    BasicBlock,
    CifarResNet,
    ShortcutA,
    ShortcutAPruner,
    create_model,
    list_models,
)
from prunebench.recipe import ModelConfig

pytestmark = pytest.mark.unit

CIFAR = timm.list_models("*_cifar")
RESNETS = [m for m in CIFAR if m.startswith("resnet")]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_fc_macs(model: nn.Module, size: int = 32) -> int:
    """Multiply-adds of conv and linear layers for one 3 x size x size image (how papers count "FLOPs")."""
    total = 0

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return total


def _graph(model: nn.Module, custom: bool = True) -> tp.DependencyGraph:
    kwargs = {"customized_pruners": customized_pruners()} if custom else {}
    return tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32), **kwargs)


def _layer_members(model: nn.Module, DG: tp.DependencyGraph, group: tp.Group) -> list[tuple[str, str, list[int]]]:
    """(module name, "out"/"in", indices) for every named module in a group (torch-pruning's dummy ops left out)."""
    names = {m: n for n, m in model.named_modules()}
    return [
        (names[it.dep.target.module], "out" if DG.is_out_channel_pruning_fn(it.dep.handler) else "in", sorted(it.idxs))
        for it in group
        if it.dep.target.module in names
    ]


# --------------------------------------------------------------------------------------------------
# registry, shapes, sizes


def test_every_cifar_model_is_registered_in_timm() -> None:
    expected = {
        "resnet8_cifar",
        "resnet20_cifar",
        "resnet32_cifar",
        "resnet56_cifar",
        "resnet110_cifar",
        "vgg16_cifar",
        "densenet40_cifar",
    }
    assert set(CIFAR) == set(CIFAR_MODELS) == expected
    assert set(timm.list_models("*cifar*")) == expected


@pytest.mark.parametrize("name", CIFAR)
def test_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=100)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    out.logsumexp(1).sum().backward()
    stem = classifier_and_stem(model)[1][0]
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", CIFAR)
def test_one_input_channel(name: str) -> None:
    model = timm.create_model(name, num_classes=10, in_chans=1).eval()
    assert classifier_and_stem(model)[1][0].in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", CIFAR)
def test_classifier_and_stem(name: str) -> None:
    model = timm.create_model(name, num_classes=7)
    classifier, stem = classifier_and_stem(model)
    assert classifier == [model.get_classifier()]
    assert isinstance(classifier[0], nn.Linear) and classifier[0].out_features == 7
    assert stem == [next(m for m in model.modules() if isinstance(m, nn.Conv2d))]
    assert stem[0].in_channels == 3


def test_classifier_and_stem_on_timm_and_plain_models() -> None:
    model = timm.create_model("resnet10t", num_classes=5)
    classifier, stem = classifier_and_stem(model)
    assert classifier == [model.fc] and stem == [model.conv1[0]]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(8), nn.Linear(8, 2))
    assert classifier_and_stem(plain) == ([plain[3]], [plain[0]])
    assert classifier_and_stem(nn.Sequential(nn.ReLU())) == ([], [])
    headless = timm.create_model("resnet10t", num_classes=0)  # no head: nothing to protect, not the last Linear
    assert classifier_and_stem(headless)[0] == []


def test_resnet56_size_matches_the_paper() -> None:
    model = timm.create_model("resnet56_cifar")
    assert _params(model) == pytest.approx(0.85e6, abs=0.01e6)
    assert _conv_fc_macs(model) == pytest.approx(125.5e6, rel=0.01)


def test_densenet40_size_matches_network_slimming() -> None:
    model = timm.create_model("densenet40_cifar")
    assert _params(model) == pytest.approx(1.0e6, abs=0.1e6)
    assert model.num_features == 16 + 3 * 12 * 12


def test_vgg16_is_the_network_slimming_variant() -> None:
    model = timm.create_model("vgg16_cifar")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert [m for m in model.modules() if isinstance(m, nn.Linear)] == [model.fc] and model.fc.in_features == 512


def test_resnet_option_b_uses_projections() -> None:
    model = timm.create_model("resnet20_cifar", shortcut="B")
    assert not any(isinstance(m, ShortcutA) for m in model.modules())
    projections = [b.shortcut for b in (model.layer2[0], model.layer3[0])]
    assert all(
        isinstance(p[0], nn.Conv2d) and p[0].kernel_size == (1, 1) and isinstance(p[1], nn.BatchNorm2d)
        for p in projections
    )
    assert _params(model) > _params(timm.create_model("resnet20_cifar"))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_weight_init_follows_the_papers() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet32_cifar")
    conv = model.layer3[1].conv2  # 64 x 64 x 3 x 3: He init with fan_out = 64 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_num_classes_zero_gives_features_like_timm() -> None:
    model = timm.create_model("resnet8_cifar", num_classes=0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)
    model.reset_classifier(4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4) and model.get_classifier().out_features == 4


# --------------------------------------------------------------------------------------------------
# create_model / list_models and their errors


def test_create_model_passes_classes_channels_and_kwargs() -> None:
    model = create_model(ModelConfig(name="resnet8_cifar", kwargs={"shortcut": "B"}), num_classes=4, in_chans=1)
    assert isinstance(model, CifarResNet) and model.get_classifier().out_features == 4
    assert model.conv1.in_channels == 1 and isinstance(model.layer2[0].shortcut, nn.Sequential)


def test_unknown_model_name_suggests_close_matches() -> None:
    with pytest.raises(UserError, match=r"unknown model 'resnet56_cifr'.*Did you mean 'resnet56_cifar'"):
        create_model(ModelConfig(name="resnet56_cifr"), num_classes=10)


@pytest.mark.parametrize("name", CIFAR)
def test_pretrained_cifar_model_is_a_user_error(name: str) -> None:
    with pytest.raises(UserError, match="no pretrained weights.*dense.checkpoint"):
        create_model(ModelConfig(name=name, pretrained=True), num_classes=10)


def test_unknown_kwarg_is_a_user_error() -> None:
    with pytest.raises(UserError, match="does not take 'shortcut_type'"):
        timm.create_model("resnet20_cifar", shortcut_type="B")
    with pytest.raises(UserError, match="shortcut='C'"):
        timm.create_model("resnet20_cifar", shortcut="C")
    with pytest.raises(UserError, match=r"model.kwargs \['num_classes'\] do not fit 'resnet10t'"):
        create_model(ModelConfig(name="resnet10t", kwargs={"num_classes": 3}), num_classes=10)


def test_pretrained_download_failure_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host answered (prunebench/weights.py let it through) but the download failed all the same; the
    case where it does not answer is tests/test_pretrained.py."""

    def offline(*args: object, **kwargs: object) -> nn.Module:
        raise OSError("Name or service not known")

    monkeypatch.setattr(weights, "check_available", lambda model: None)
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="could not be downloaded.*dense.checkpoint.*pretrained: false"):
        create_model(ModelConfig(name="resnet18", pretrained=True), num_classes=10)


def test_list_models_puts_cifar_first() -> None:
    everything = list_models()
    assert everything[: len(CIFAR_MODELS)] == CIFAR_MODELS
    assert "resnet18" in everything and len(everything) == len(set(everything))
    assert list_models("*_cifar") == CIFAR


# --------------------------------------------------------------------------------------------------
# torch-pruning


@pytest.mark.parametrize("name", CIFAR)
def test_dependency_graph_builds(name: str) -> None:
    """A plain ``build_dependency`` call (no customized pruners) traces every model; block internals are exact."""
    model = timm.create_model(name)
    DG = _graph(model, custom=False)
    groups = list(DG.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
    roots = {g[0].dep.target.module for g in groups}
    assert model.get_classifier() in roots
    if name.startswith("resnet"):  # the group rooted at each block's conv1 is the internal pair, nothing else
        blocks = [(n, b) for n, b in model.named_modules() if isinstance(b, BasicBlock)]
        assert len(blocks) == (int(name.removeprefix("resnet").removesuffix("_cifar")) - 2) // 2
        for prefix, block in blocks:
            group = next(g for g in groups if g[0].dep.target.module is block.conv1)
            chans = list(range(block.conv1.out_channels))
            assert _layer_members(model, DG, group) == [
                (f"{prefix}.conv1", "out", chans),
                (f"{prefix}.bn1", "out", chans),
                (f"{prefix}.conv2", "in", chans),
            ], prefix


@pytest.mark.parametrize("name", RESNETS)
def test_residual_stream_groups_stop_at_option_a_shortcuts(name: str) -> None:
    """With the customized pruner each stage's stream is its own group, every index within its layer's width."""
    model = timm.create_model(name)
    DG = _graph(model)
    blocks = sum(len(stage) for stage in (model.layer1, model.layer2, model.layer3))
    assert len(list(DG.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))) == blocks + 3 + 1  # + streams + fc
    expected = {
        16: [("layer2.0.shortcut", "in")],
        32: [("layer2.0.shortcut", "out"), ("layer3.0.shortcut", "in")],
        64: [("layer3.0.shortcut", "out")],
    }
    for stage, width in ((model.layer1, 16), (model.layer2, 32), (model.layer3, 64)):
        group = DG.get_pruning_group(stage[-1].conv2, tp.prune_conv_out_channels, list(range(width)))
        members = _layer_members(model, DG, group)
        assert all(idxs == list(range(width)) for _, _, idxs in members)
        shortcuts = sorted((n, side) for n, side, _ in members if isinstance(model.get_submodule(n), ShortcutA))
        assert shortcuts == expected[width]


def test_shortcut_a_is_zero_padding() -> None:
    sc = ShortcutA(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(sc(x), F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
    assert not list(sc.parameters())


def test_shortcut_a_pruner_matches_slicing() -> None:
    """Cutting outputs equals dropping them; cutting an input equals zeroing it and leaves its output slot at zero."""
    sc, pruner = ShortcutA(4, 8, 1), ShortcutAPruner()
    x = torch.randn(1, 4, 3, 3)
    full = sc(x)
    pruner.prune_out_channels(sc, [0, 3, 6])  # a padded channel, a data channel, a padded channel
    keep_out = [1, 2, 4, 5, 7]
    torch.testing.assert_close(sc(x), full[:, keep_out])
    assert (sc.in_channels, sc.out_channels) == (4, 5)
    pruner.prune_in_channels(sc, [2])
    x_zeroed = x.clone()
    x_zeroed[:, 2] = 0
    torch.testing.assert_close(sc(x[:, [0, 1, 3]]), ShortcutA(4, 8, 1)(x_zeroed)[:, keep_out])
    assert (pruner.get_in_channels(sc), pruner.get_out_channels(sc)) == (3, 5)


def test_removing_an_all_zero_stream_group_keeps_the_output() -> None:
    """The design's invariant on residual streams across option-A shortcuts (torch-pruning surgery end to end)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet8_cifar").eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.1, 0.1)
    x = torch.randn(2, 3, 32, 32)
    DG = _graph(model)
    # stage-1 stream channels 3 and 7; stage-2 stream channels 0 and 31 (zero padding in the shortcut)
    for root, idxs in ((model.conv1, [3, 7]), (model.layer2[0].conv2, [0, 31])):
        group = DG.get_pruning_group(root, tp.prune_conv_out_channels, idxs)
        with torch.no_grad():
            for it in group:
                m = it.dep.target.module
                if DG.is_out_channel_pruning_fn(it.dep.handler) and isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                    m.weight[it.idxs] = 0
                    if m.bias is not None:
                        m.bias[it.idxs] = 0
            before = model(x)
        group.prune()
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    sc = model.layer2[0].shortcut
    assert (sc.in_channels, sc.out_channels) == (14, 30) and sc.src.tolist() == list(range(14))
    assert sc.dst.tolist() == [7, 8, 9, 11, 12, 13, 15, 16, 17, 18, 19, 20, 21, 22]
