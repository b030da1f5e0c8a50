"""Models: CIFAR backbones registered into timm's registry, and helpers the harness needs around them.

Every backbone is a timm model name. Importing this module -- or timm, once prunebench is imported (see
``prunebench/__init__.py``) -- registers the classic CIFAR networks that pruning papers report on, so
``timm.create_model("resnet56_cifar", num_classes=10)`` and ``timm.list_models("*_cifar")`` see them:

* ``resnet{8,20,32,56,110}_cifar`` -- He et al. 2016, section 4.2: a 3x3 stem with 16 channels, three
  stages of n basic blocks with 16/32/64 channels, global average pooling, one linear layer. Shortcuts
  are option A (parameter-free) by default, ``shortcut="B"`` gives 1x1 conv + BN projections.
* ``vgg16_cifar`` -- VGG-16 with BatchNorm as in Network Slimming (Liu et al. 2017) and Li et al. 2017,
  with the small head of the Network Slimming code (global pooling, one Linear(512, num_classes)).
* ``densenet40_cifar`` -- DenseNet-40 (Huang et al. 2017) with growth rate 12, no bottleneck and no
  compression, as in Network Slimming.

No pretrained CIFAR weights are published, so ``pretrained=True`` is a :class:`UserError`: train the
dense model (the harness caches it) or load one with ``dense.checkpoint``.

Option-A shortcuts and torch-pruning
------------------------------------
Option A subsamples the block input spatially and places its channels among zero channels (in the
middle, as in the widely used reimplementations). torch-pruning does not understand zero padding: it
treats an unknown op as element-wise and maps channel ``j`` of the 16-channel stream onto channel ``j``
of the 32-channel stream, which is wrong (the data goes to channel ``8 + j``) and asks for channels the
narrower stream does not have. :class:`ShortcutA` therefore keeps the placement explicit, as two index
buffers (input channel ``src[k]`` goes to output channel ``dst[k]``), and :class:`ShortcutAPruner` tells
torch-pruning how to cut them. It is registered with :func:`prunebench.groups.register_pruner`; pass :func:`prunebench.groups.customized_pruners` to
``DependencyGraph.build_dependency(..., customized_pruners=...)`` (and to torch-pruning's pruners): the
residual streams before and after the shortcut then form separate groups -- which is exact, since no
weight ties them -- and removing a channel on either side only edits the index buffers. Without it the
graph still builds and the groups inside the blocks (conv1 -> bn1 -> conv2) are right, but the
residual streams (scope ``all``) come out as one 16-channel group across all three stages, and cutting it
breaks the forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torch_pruning as tp
from timm.models import register_model
from torch import Tensor, nn

from prunebench import weights
from prunebench.errors import UserError, close_matches, quiet_loggers
from prunebench.groups import register_pruner
from prunebench.recipe import ModelConfig

__all__ = [
    "CIFAR_MODELS",
    "BasicBlock",
    "CifarDenseNet",
    "CifarResNet",
    "CifarVGG",
    "DenseLayer",
    "ShortcutA",
    "ShortcutAPruner",
    "Transition",
    "create_model",
    "list_models",
]

#: Names of the CIFAR models this module registers into timm, in registration order.
CIFAR_MODELS: list[str] = []

# Arguments timm's create_model passes to every entrypoint; CIFAR models have no use for them.
_TIMM_PASSTHROUGH = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"})


# --------------------------------------------------------------------------------------------------
# shared pieces


class _ClassifierMixin:
    """timm's classifier interface (``get_classifier``/``reset_classifier``) for a model whose head is ``fc``."""

    fc: nn.Module
    num_features: int
    num_classes: int

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for ``num_classes`` classes (0 gives an identity, as in timm)."""
        self.num_classes = num_classes
        self.fc = _head(self.num_features, num_classes)


def _head(num_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()


def _init_weights(model: nn.Module) -> None:
    """He-normal convs (fan-out, as in the Network Slimming and torchvision code), BN gamma=1 beta=0, zero biases.

    Linear weights keep PyTorch's default (uniform in +-1/sqrt(fan_in)).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)


def _check_kwargs(model: str, kwargs: dict[str, Any]) -> None:
    """Drop what timm passes to every model; anything else is a misspelled or unsupported argument."""
    unknown = sorted(set(kwargs) - _TIMM_PASSTHROUGH)
    if unknown:
        raise UserError(f"model {model!r} does not take {', '.join(map(repr, unknown))}; remove it from model.kwargs")


def _no_pretrained(model: str, pretrained: bool) -> None:
    if pretrained:
        raise UserError(
            f"no pretrained weights are published for {model!r}; set model.pretrained: false and train the dense "
            "model, or load your own with dense.checkpoint"
        )


def _cifar_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` into timm's registry under its name and remember it as a CIFAR model."""
    if fn.__name__ not in CIFAR_MODELS:
        CIFAR_MODELS.append(fn.__name__)
    return register_model(fn)


# --------------------------------------------------------------------------------------------------
# ResNet (He et al. 2016, CIFAR variant)


class ShortcutA(nn.Module):
    """Parameter-free option-A shortcut: keep every ``stride``-th pixel, put the channels among zero channels.

    Input channel ``src[k]`` lands on output channel ``dst[k]``. Initially ``src = 0..c_in-1`` and ``dst =
    src + (c_out - c_in) // 2`` (zero padding split evenly on both sides). The two index buffers make the
    placement survive channel pruning (see :class:`ShortcutAPruner` and the module docstring).
    """

    src: Tensor
    dst: Tensor

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A pads channels, it cannot shrink {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        src = torch.arange(in_channels)
        self.register_buffer("src", src)
        self.register_buffer("dst", src + (out_channels - in_channels) // 2)

    def forward(self, x: Tensor) -> Tensor:
        # keep channels_last inputs channels_last, so the residual sum does not fall back to NCHW
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        shape = (x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
        return out.index_copy_(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _drop_and_renumber(kept_idx: Tensor, other: Tensor, removed: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Drop the pairs whose ``kept_idx`` was removed and renumber the survivors to the shrunken channel range.

    ``kept_idx`` and ``other`` are the two parallel index buffers of a :class:`ShortcutA`; the side being
    pruned is ``kept_idx``.
    """
    gone = torch.as_tensor(sorted(set(int(i) for i in removed)), dtype=kept_idx.dtype, device=kept_idx.device)
    keep = ~torch.isin(kept_idx, gone)
    survivors = kept_idx[keep]
    return survivors - torch.searchsorted(gone, survivors), other[keep]


class ShortcutAPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's surgery for :class:`ShortcutA`: removing channels only edits its index buffers.

    ``prune_out_channels`` is not ``prune_in_channels``, so torch-pruning sees no dependency between the
    input and output channels of the shortcut: the residual streams on either side are pruned
    independently. A removed output channel drops the input channel that fed it from the shortcut; a
    removed input channel leaves its output channel zero.
    """

    TARGET_MODULES = (ShortcutA,)

    def prune_out_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
        layer.dst, layer.src = _drop_and_renumber(layer.dst, layer.src, idxs)
        layer.out_channels -= len(set(idxs))
        return layer

    def prune_in_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
        layer.src, layer.dst = _drop_and_renumber(layer.src, layer.dst, idxs)
        layer.in_channels -= len(set(idxs))
        return layer

    def get_out_channels(self, layer: ShortcutA) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ShortcutA) -> int:
        return layer.in_channels


register_pruner(ShortcutA, ShortcutAPruner)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3, 1)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(cin, cout, stride)
        else:
            self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(_ClassifierMixin, nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem, three stages of ``n`` basic blocks (16/32/64 channels), pool, linear."""

    def __init__(
        self,
        n: int,
        num_classes: int = 10,
        in_chans: int = 3,
        shortcut: str = "A",
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise UserError(
                f"shortcut={shortcut!r} is not a CIFAR ResNet shortcut; use 'A' (zero padding) or 'B' (1x1 conv)"
            )
        self.conv1, self.bn1 = _conv_bn(in_chans, widths[0])
        self.relu = nn.ReLU()
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1, shortcut) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features, self.num_classes = cin, num_classes
        self.fc = _head(cin, num_classes)
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _resnet(
    name: str, n: int, pretrained: bool, num_classes: int, in_chans: int, shortcut: str, kwargs: dict[str, Any]
) -> CifarResNet:
    _check_kwargs(name, kwargs)
    _no_pretrained(name, pretrained)
    return CifarResNet(n, num_classes=num_classes, in_chans=in_chans, shortcut=shortcut)


@_cifar_model
def resnet8_cifar(
    pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", **kwargs: Any
) -> CifarResNet:
    """ResNet-8 (n=1): not from a paper; small enough for tests and demos."""
    return _resnet("resnet8_cifar", 1, pretrained, num_classes, in_chans, shortcut, kwargs)


@_cifar_model
def resnet20_cifar(
    pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", **kwargs: Any
) -> CifarResNet:
    """ResNet-20 (He et al. 2016): 0.27 M parameters, 40.6 M conv+linear MACs."""
    return _resnet("resnet20_cifar", 3, pretrained, num_classes, in_chans, shortcut, kwargs)


@_cifar_model
def resnet32_cifar(
    pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", **kwargs: Any
) -> CifarResNet:
    """ResNet-32 (He et al. 2016): 0.46 M parameters, 68.9 M conv+linear MACs."""
    return _resnet("resnet32_cifar", 5, pretrained, num_classes, in_chans, shortcut, kwargs)


@_cifar_model
def resnet56_cifar(
    pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", **kwargs: Any
) -> CifarResNet:
    """ResNet-56 (He et al. 2016): 0.85 M parameters, 125.5 M conv+linear MACs."""
    return _resnet("resnet56_cifar", 9, pretrained, num_classes, in_chans, shortcut, kwargs)


@_cifar_model
def resnet110_cifar(
    pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", **kwargs: Any
) -> CifarResNet:
    """ResNet-110 (He et al. 2016): 1.73 M parameters, 252.9 M conv+linear MACs."""
    return _resnet("resnet110_cifar", 18, pretrained, num_classes, in_chans, shortcut, kwargs)


# --------------------------------------------------------------------------------------------------
# VGG-16 (Network Slimming / Li et al. 2017 CIFAR variant)

_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class CifarVGG(_ClassifierMixin, nn.Module):
    """VGG with BN for 32x32 inputs: conv3x3-BN-ReLU stacks and max pools, global average pool, one linear.

    As in the Network Slimming code: no pool after the last conv stack (its 2x2 map is averaged).
    """

    def __init__(self, cfg: Sequence[int | str] = _VGG16_CFG, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.extend((*_conv_bn(cin, int(v)), nn.ReLU()))
            cin = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features, self.num_classes = cin, num_classes
        self.fc = _head(cin, num_classes)
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@_cifar_model
def vgg16_cifar(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarVGG:
    """VGG-16 with BN (Network Slimming's CIFAR variant): 14.7 M parameters, 313 M conv+linear MACs."""
    _check_kwargs("vgg16_cifar", kwargs)
    _no_pretrained("vgg16_cifar", pretrained)
    return CifarVGG(_VGG16_CFG, num_classes=num_classes, in_chans=in_chans)


# --------------------------------------------------------------------------------------------------
# DenseNet-40 (Huang et al. 2017; the Network Slimming configuration)


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth`` new channels, concatenated after its input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2x2 between dense blocks."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class CifarDenseNet(_ClassifierMixin, nn.Module):
    """DenseNet for 32x32 inputs: 3x3 stem, three dense blocks with transitions, BN-ReLU, pool, linear.

    ``depth = 3 * layers_per_block + 4``; ``compression`` scales the channels at each transition (1 = none).
    """

    def __init__(
        self,
        depth: int = 40,
        growth: int = 12,
        compression: float = 1.0,
        stem: int = 16,
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        n = (depth - 4) // 3
        self.conv1 = nn.Conv2d(in_chans, stem, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        c = stem
        for i in range(3):
            stages.append(nn.Sequential(*(DenseLayer(c + j * growth, growth) for j in range(n))))
            c += n * growth
            if i < 2:
                cout = int(math.floor(c * compression))
                stages.append(Transition(c, cout))
                c = cout
        self.dense1, self.trans1, self.dense2, self.trans2, self.dense3 = stages
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features, self.num_classes = c, num_classes
        self.fc = _head(c, num_classes)
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.dense3(self.trans2(self.dense2(self.trans1(self.dense1(x)))))
        return self.relu(self.bn(x))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@_cifar_model
def densenet40_cifar(
    pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs: Any
) -> CifarDenseNet:
    """DenseNet-40, growth rate 12, no bottleneck, no compression: 1.02 M parameters, 265 M conv+linear MACs."""
    _check_kwargs("densenet40_cifar", kwargs)
    _no_pretrained("densenet40_cifar", pretrained)
    return CifarDenseNet(depth=40, growth=12, compression=1.0, stem=16, num_classes=num_classes, in_chans=in_chans)


# helpers used by the harness ---------------------------------------------------------------------


def create_model(cfg: ModelConfig, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Build the recipe's model through timm; every failure a user can fix becomes a one-line :class:`UserError`."""
    if not timm.is_model(cfg.name):
        raise UserError(f"model.name: unknown model {cfg.name!r}.{close_matches(cfg.name, timm.list_models())}")
    weights.check_available(cfg)  # pretrained weights neither cached nor downloadable: refused in seconds
    try:
        with quiet_loggers("huggingface_hub"):  # offline, the hub logs each failed request; the error says it once
            return timm.create_model(
                cfg.name, pretrained=cfg.pretrained, num_classes=num_classes, in_chans=in_chans, **cfg.kwargs
            )
    except OSError as exc:  # no network / no Hugging Face Hub cache (URLError, LocalEntryNotFoundError, ...)
        if not cfg.pretrained:
            raise
        raise UserError(
            f"pretrained weights for {cfg.name!r} could not be downloaded ({type(exc).__name__}); check the network "
            "or the HF_HUB cache, give a dense.checkpoint, or set model.pretrained: false"
        ) from None
    except RuntimeError as exc:
        if cfg.pretrained and "pretrained" in str(exc).lower():
            raise UserError(f"timm has no pretrained weights for {cfg.name!r}; set model.pretrained: false") from None
        raise
    except TypeError as exc:  # a misspelled kwarg, or num_classes/in_chans given twice
        if "keyword argument" not in str(exc):
            raise
        raise UserError(f"model.kwargs {sorted(cfg.kwargs)} do not fit {cfg.name!r}: {exc}") from None


def list_models(pattern: str | None = None) -> list[str]:
    """Model names for ``pattern`` (timm's wildcard syntax); without one, the CIFAR models first, then timm's."""
    if pattern:
        return timm.list_models(pattern)
    cifar = set(CIFAR_MODELS)
    return CIFAR_MODELS + [m for m in timm.list_models() if m not in cifar]
