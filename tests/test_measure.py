"""MACs, parameters and latency (docs/fairness.md "MACs and parameters")."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from torch import nn

import prunebench.models  # noqa: F401  (registers the CIFAR models into timm)
from prunebench.measure import count_macs, eager_caller, paired_latency


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resnet56_matches_the_papers() -> None:
    model = timm.create_model("resnet56_cifar", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    count_macs(model, x)  # first call pays for the jit tracer's warm-up
    t = time.perf_counter()
    r = count_macs(model, x)
    seconds = time.perf_counter() - t
    print(
        f"resnet56_cifar: {r.macs / 1e6:.2f} M MACs (fvcore), {r.macs_conv_fc / 1e6:.2f} M conv+fc, "
        f"{r.params / 1e6:.3f} M params, {seconds:.2f} s"
    )
    assert r.macs_conv_fc == pytest.approx(125.5e6, rel=0.01)
    assert r.macs == pytest.approx(128.2e6, rel=0.02)  # fvcore adds BN (2 per element) and pooling
    assert r.params == pytest.approx(0.85e6, rel=0.01)
    # its time budget is the macs_count_s target of `prunebench bench` (no wall-clock assert in a test)


def test_resnet18_counts_are_consistent() -> None:
    model = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(1, 3, 224, 224)
    model.train()
    r = count_macs(model, x)
    assert model.training  # the count ran in eval mode and gave the mode back
    assert r.macs_conv_fc == pytest.approx(1.814e9, rel=0.01)  # the well-known 1.8 GMACs
    assert r.macs_conv_fc < r.macs < 1.01 * r.macs_conv_fc
    assert r.params == sum(p.numel() for p in model.parameters())
    layers = {row["name"]: row for row in r.per_layer}
    assert len(layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert r.macs_conv_fc == sum(row["macs"] for row in r.per_layer)
    assert layers["conv1"] == {
        "name": "conv1",
        "type": "Conv2d",
        "in_channels": 3,
        "out_channels": 64,
        "macs": 118013952,
    }
    assert layers["fc"]["macs"] == 512 * 10
    assert r.by_module[""] == r.macs and r.by_module["layer1.0.bn1"] > 0


def test_paired_latency_on_cpu_leaves_the_models_alone() -> None:
    dense = timm.create_model("resnet8_cifar", num_classes=10).train()
    small = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    callers = {"dense": eager_caller(dense, (3, 32, 32), "cpu"), "small": eager_caller(small, (3, 32, 32), "cpu")}
    res = paired_latency(callers, {"small": "dense"}, batch_sizes=(1, 4, 4), warmup=1, rounds=3)
    assert set(res) == {1, 4} and set(res[1]) == {"small"}
    for p in (res[1]["small"], res[4]["small"]):
        assert 0 < p.ms < p.baseline_ms and p.speedup > 1 and p.spread >= 0
    assert dense.training and next(dense.parameters()).is_contiguous()  # the callers timed copies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paired_latency_on_cuda() -> None:
    model = timm.create_model("resnet20_cifar", num_classes=10)
    callers = {"a": eager_caller(model, (3, 32, 32), "cuda"), "b": eager_caller(model, (3, 32, 32), "cuda")}
    res = paired_latency(callers, {"b": "a"}, batch_sizes=(1, 64))
    assert set(res) == {1, 64} and all(p.ms > 0 for r in res.values() for p in r.values())
    assert next(model.parameters()).device.type == "cpu"
