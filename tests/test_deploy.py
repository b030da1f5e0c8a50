"""ONNX export and ONNX Runtime inference (prunebench.deploy): outputs match PyTorch on several model families
and on pruned models at any batch size, the caller's model and logs are left alone, an operator no exporter
supports is one short ExportError, the session uses torch's threads."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from torch import Tensor, nn

import prunebench.models  # noqa: F401  (registers the CIFAR models into timm)
from prunebench.deploy import ExportError, OrtModel, check_outputs, export_onnx
from prunebench.engine import prune_to_target
from prunebench.registry import available_methods

CHATTY = ("torch", "onnxscript", "onnx_ir", "onnx")


def build(name: str, size: int, pruned: bool) -> nn.Module:
    """A timm model with 10 classes, optionally pruned by 40% of its MACs with l1 (odd channel widths)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    if pruned:
        prune_to_target(model, available_methods()["l1"](), 0.4, torch.randn(1, 3, size, size))
    return model


class Svd(nn.Module):
    """A conv followed by singular values: neither exporter has an ONNX translation of the SVD."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.linalg.svdvals(self.conv(x).flatten(2))


class DataDependent(nn.Module):
    """A branch on a tensor's value: torch.export cannot trace it, the TorchScript tracer bakes it in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if y.abs().sum() >= 0:  # always true: the traced graph is the model
            y = y.relu()
        return y.mean((2, 3))


def tiny() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)
    )


def foreign_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()[:80]}" for r in caplog.records if r.name.split(".")[0] in CHATTY]


@pytest.mark.parametrize(
    "name,size,pruned",
    [
        ("resnet8_cifar", 32, False),
        ("regnetx_002", 64, False),  # grouped convolutions
        ("convnext_atto", 64, False),  # depthwise 7x7, LayerNorm, GELU, layer scale
        ("resnet20_cifar", 32, True),
        ("mobilenetv3_small_050", 64, True),  # squeeze-excitation, depthwise, hard-swish; pruned only (time)
    ],
    ids=["resnet8_cifar", "regnetx", "convnext", "resnet20_cifar-pruned", "mobilenetv3-pruned"],
)
def test_outputs_match_pytorch(tmp_path: Path, name: str, size: int, pruned: bool) -> None:
    model = build(name, size, pruned)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    if pruned:
        assert any(w % 2 for w in widths), widths  # the odd widths pruning leaves are exercised
    shape = (3, size, size)
    path = export_onnx(model, shape, tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx" and path.is_file()
    session = OrtModel(path)
    assert session.sample_shape == shape
    for batch in (1, 3):  # the batch dimension is dynamic
        diff = check_outputs(model, session, shape, batch=batch)
        assert 0.0 <= diff < 1e-4
    assert session(torch.randn(5, *shape)).shape == (5, 10)


@pytest.mark.unit
def test_export_leaves_the_model_and_the_logs_alone(
    tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    model = timm.create_model("resnet8_cifar", num_classes=10).train().to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, (3, 32, 32), tmp_path / "m.onnx")
        check_outputs(model, OrtModel(tmp_path / "m.onnx"), (3, 32, 32))
    assert all(m.training for m in model.modules())
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv1.weight.requires_grad and next(model.parameters()).device.type == "cpu"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())  # inputs come from private generators
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert not [str(w.message)[:80] for w in caught]
    assert not foreign_records(caplog)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left beside it


@pytest.mark.unit
def test_unsupported_operator_is_one_short_export_error(
    tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ExportError) as info:
        export_onnx(Svd(), (3, 8, 8), tmp_path / "svd.onnx")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "\n" not in message and len(message) < 500, message
    assert "dynamo: " in message and "TorchScript: " in message  # both exporters were tried
    assert "linalg_svd" in message, message  # the cause is named
    assert "\x1b" not in message  # no terminal colours in an MLflow tag
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file
    # both exporters' chatter is gone, the TorchScript exporter's C++ graph dump included
    assert capfd.readouterr() == ("", "")
    assert not foreign_records(caplog)


@pytest.mark.unit
def test_falls_back_to_the_torchscript_exporter(
    tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    model = DataDependent()
    caplog.set_level(logging.INFO, logger="prunebench.deploy")
    path = export_onnx(model, (3, 8, 8), tmp_path / "dd.onnx")
    assert any("TorchScript exporter" in r.getMessage() for r in caplog.records)
    assert not torch._C._jit_is_onnx_log_enabled()  # torch leaves its C++ ONNX log on; export_onnx turns it off
    session = OrtModel(path)
    for batch in (1, 4):
        check_outputs(model, session, (3, 8, 8), batch=batch)
    assert capfd.readouterr() == ("", "")


@pytest.mark.unit
def test_session_uses_torch_threads_and_times_a_batch(tmp_path: Path) -> None:
    model = tiny()
    path = export_onnx(model, (3, 10, 10), tmp_path / "tiny.onnx")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            session = OrtModel(path)
            assert session.threads == n == session.session.get_session_options().intra_op_num_threads
    finally:
        torch.set_num_threads(threads)
    options = session.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session.providers == ["CPUExecutionProvider"]
    for batch in (1, 4):
        run = session.timed_call(batch)
        run()
        run()
    x = np.random.default_rng(1).standard_normal((2, 3, 10, 10), dtype=np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.unit
def test_mismatched_outputs_raise(tmp_path: Path) -> None:
    model = tiny()
    path = export_onnx(model, (3, 10, 10), tmp_path / "tiny.onnx")
    with torch.no_grad():
        model[-1].bias.add_(0.1)  # the PyTorch model no longer matches the file
    with pytest.raises(ExportError, match="max abs difference 0.1"):
        check_outputs(model, OrtModel(path), (3, 10, 10))
