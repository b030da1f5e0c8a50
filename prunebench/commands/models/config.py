"""What ``prunebench models --check`` checks: the models (one per family by default), the input size, the
targets and the cap. See :mod:`prunebench.commands.models`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm

from prunebench.errors import UserError, close_matches
from prunebench.models import list_models
from prunebench.recipe import PruneConfig

DEFAULT_MODELS: tuple[str, ...] = (
    "resnet18",
    "resnext26ts",
    "regnetx_002",
    "regnety_002",
    "efficientnet_b0",
    "mixnet_s",
    "mobilenetv3_small_050",
    "mobilenetv2_050",
    "ghostnet_100",
    "convnext_atto",
    "densenet121",
    "vgg11",
    "repvgg_a0",
    "dla34",
    "cspresnet50",
    "resnet20_cifar",
    "resnet56_cifar",
)
"""One timm CNN per family (ResNet, ResNeXt, RegNetX/Y, EfficientNet, MixNet, MobileNetV3/V2, GhostNet,
ConvNeXt, DenseNet, VGG, RepVGG, DLA, CSPNet) and the CIFAR ResNets: the default of ``--check``."""

DEFAULT_TARGETS: tuple[float, ...] = (0.3, 0.5)
DEFAULT_CAP: float = PruneConfig.model_fields["max_layer_ratio"].default
"""The recipe's default ``prune.max_layer_ratio``: the cap the reachable figures are computed under."""


@dataclass(frozen=True)
class ZooConfig:
    """One check of a list of models.

    ``models``: timm names, built with random weights (nothing is downloaded) for ``num_classes`` classes
    and traced at ``size`` x ``size`` pixels. Every method in ``methods`` (default: every registered one)
    prunes a fresh copy of each model to every target in ``targets`` in scope ``auto``, capped at
    ``max_layer_ratio``; calibrated methods (ThiNet) see ``calib_images`` random images. ``threads``: torch
    threads while checking -- one by default: at batch one and 64 pixels, several threads on a busy machine
    made a cut ten times slower, not faster.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    size: int = 64
    num_classes: int = 10
    targets: tuple[float, ...] = DEFAULT_TARGETS
    methods: tuple[str, ...] | None = None
    max_layer_ratio: float = DEFAULT_CAP
    calib_images: int = 8
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.size < 8:
            raise UserError(f"models --check: --size must be at least 8 pixels, got {self.size}")
        if self.threads < 1:
            raise UserError(f"models --check: threads must be at least 1, got {self.threads}")
        if not self.models:
            raise UserError("models --check: no model to check")
        for t in self.targets:
            if not 0 < t < 1:
                raise UserError(f"models --check: a target is a MACs reduction in (0, 1), got {t}")


def resolve_models(patterns: Sequence[str]) -> tuple[str, ...]:
    """The model names ``patterns`` select (timm's wildcards; a plain name is itself), in the order given,
    without repeats; :data:`DEFAULT_MODELS` without a pattern. A pattern that matches nothing is a
    :class:`UserError`."""
    if not patterns:
        return DEFAULT_MODELS
    names: list[str] = []
    for pattern in patterns:
        wildcard = any(c in pattern for c in "*?[")
        hits = list_models(pattern) if wildcard else [pattern] if timm.is_model(pattern) else []
        if not hits:
            hint = "" if wildcard else close_matches(pattern, timm.list_models())
            raise UserError(f"no model matches {pattern!r}; 'prunebench models' lists the names.{hint}")
        names.extend(h for h in hits if h not in names)
    return tuple(names)
