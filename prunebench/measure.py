"""MACs, parameters and latency of a (pruned) model.

fvcore's ``FlopCountAnalysis`` counts one multiply-add as one "flop", so its total is what we call
``macs``. It also counts BatchNorm and adaptive pooling; papers quote conv and linear multiply-adds only,
so :func:`count_macs` reports both (``macs`` and ``macs_conv_fc``, docs/fairness.md).
The per-module counts (``by_module``) feed the pruning engine's cost model, which scales them with
channel counts instead of re-tracing the model for every channel it removes.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

with warnings.catch_warnings():  # fvcore's imports warn about deprecated iopath/portalocker usage
    warnings.simplefilter("ignore")
    from fvcore.nn import FlopCountAnalysis, parameter_count

_CONV_FC = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class MacsReport:
    """One fvcore count: totals, the conv/linear table and the raw per-module counts."""

    macs: int
    macs_conv_fc: int
    params: int
    per_layer: list[dict] = field(default_factory=list)
    by_module: dict[str, int] = field(default_factory=dict)


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for a measurement; the previous mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def count_macs(model: nn.Module, example_input: Tensor) -> MacsReport:
    """Count MACs (fvcore "flops") and parameters of ``model`` on ``example_input`` (batch of one).

    Counted in eval mode (BatchNorm as at inference); fvcore's warnings about operators it does not
    count (ReLU, adds) and modules the trace never called are silenced: they are expected.
    """
    device = next(model.parameters()).device
    with _eval_no_grad(model), warnings.catch_warnings(), _quiet_fvcore():
        warnings.simplefilter("ignore")  # jit tracer and deprecation warnings
        analysis = FlopCountAnalysis(model, (example_input.to(device),))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = int(analysis.total())
        by_module = {k: int(v) for k, v in analysis.by_module().items()}
    per_layer = [
        {
            "name": name,
            "type": type(m).__name__,
            "in_channels": _in_channels(m),
            "out_channels": _out_channels(m),
            "macs": by_module.get(name, 0),
        }
        for name, m in model.named_modules()
        if isinstance(m, _CONV_FC)
    ]
    return MacsReport(
        macs=total,
        macs_conv_fc=sum(row["macs"] for row in per_layer),
        params=int(parameter_count(model)[""]),
        per_layer=per_layer,
        by_module=by_module,
    )


@contextmanager
def _quiet_fvcore() -> Iterator[None]:
    """Silence fvcore's logger (it logs skipped operators at WARNING level) for one count."""
    loggers = [logging.getLogger(n) for n in ("fvcore", "fvcore.nn.jit_analysis")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _in_channels(m: nn.Module) -> int:
    return int(m.in_features if isinstance(m, nn.Linear) else m.in_channels)


def _out_channels(m: nn.Module) -> int:
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def latency_ready(model: nn.Module, device: str | torch.device) -> nn.Module:
    """A copy of ``model`` prepared the way latency is measured: on ``device``, eval mode, channels_last.

    channels_last on every device, the CPU included, as a deployment would choose: oneDNN runs NHWC
    convolutions directly (brgemm kernels), while an NCHW input is reordered to a channel-blocked layout
    before every convolution and back after it, with the channel count padded up to the vector width
    (8 floats on AVX2), which costs most on the odd widths pruning leaves (``prunebench bench`` measures it:
    reports/perf/). The caller's model is left as it was.
    """
    net = copy.deepcopy(model).to(device).eval()
    return net.to(memory_format=torch.channels_last)


def measure_latency(
    model: nn.Module,
    example_input_shape: Sequence[int],
    device: str | torch.device,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 3,
    repeats: int = 10,
) -> dict[int, float]:
    """Median milliseconds per forward pass at each batch size.

    ``example_input_shape`` is one sample's shape (``C, H, W``; a leading batch dimension is dropped).
    Runs on a copy of the model (see :func:`latency_ready`: channels_last on every device), in eval
    mode under ``inference_mode``; on CUDA with bf16 autocast, as a deployment would, and with a
    synchronize around every timed call so the figure is the kernel time, not launch time.
    """
    device = torch.device(device)
    shape = tuple(example_input_shape)[-3:] if len(example_input_shape) >= 4 else tuple(example_input_shape)
    cuda = device.type == "cuda"
    net = latency_ready(model, device)
    out: dict[int, float] = {}
    for bs in batch_sizes:
        x = latency_input(bs, shape, device)
        times = []
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            for i in range(warmup + repeats):
                _sync(device)
                t0 = time.perf_counter()
                net(x)
                _sync(device)
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
        out[int(bs)] = statistics.median(times)
    return out


def latency_input(batch: int, shape: Sequence[int], device: torch.device) -> Tensor:
    """A random input batch of one sample ``shape`` (``C, H, W``), channels_last when it is an image batch."""
    x = torch.randn((batch, *shape), device=device)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
