"""MACs, parameters and latency of a (pruned) model.

fvcore's ``FlopCountAnalysis`` counts one multiply-add as one "flop", so its total is what we call
``macs``. It also counts BatchNorm and adaptive pooling; papers quote conv and linear multiply-adds only,
so :func:`count_macs` reports both (``macs`` and ``macs_conv_fc``, docs/fairness.md).
The per-module counts (``by_module``) feed the pruning engine's cost model, which scales them with
channel counts instead of re-tracing the model for every channel it removes.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prunebench.errors import quiet_loggers
from prunebench.timing import Paired, interleaved, pair

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
    with _eval_no_grad(model), warnings.catch_warnings(), quiet_loggers("fvcore", "fvcore.nn.jit_analysis"):
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


Caller = Callable[[int], Callable[[], object]]
"""A model ready for timing: batch size -> one call on a prepared input of that batch (no argument)."""


def forward_call(net: nn.Module, x: Tensor) -> Callable[[], None]:
    """One forward of ``net`` on ``x`` as latency is measured: eval mode under ``inference_mode``, and bf16
    autocast on CUDA as a deployment would; pass a model from :func:`latency_ready`."""
    net.eval()
    cuda = x.device.type == "cuda"

    def run() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
            net(x)

    return run


def eager_caller(model: nn.Module, sample_shape: Sequence[int], device: str | torch.device) -> Caller:
    """``model`` timed in eager PyTorch: a :func:`latency_ready` copy (channels_last) called on random inputs."""
    device = torch.device(device)
    net = latency_ready(model, device)
    return lambda batch: forward_call(net, latency_input(batch, sample_shape, device))


def paired_latency(
    callers: Mapping[str, Caller],
    baselines: Mapping[str, str],
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 3,
    rounds: int = 10,
) -> dict[int, dict[str, Paired]]:
    """Batch size -> variant -> its latency and speedup against its baseline, all timed in the same rounds.

    ``baselines`` maps each variant to compare to the caller it is compared with (e.g. ``pruned -> dense``,
    ``pruned_onnx -> dense_onnx``). Every caller runs in every round of :func:`prunebench.timing.interleaved`,
    so a load change falls on all of them; a speedup is the median of the per-round ratios and its spread
    says how much the rounds disagreed.
    """
    out: dict[int, dict[str, Paired]] = {}
    for bs in dict.fromkeys(int(b) for b in batch_sizes):
        times = interleaved({name: make(bs) for name, make in callers.items()}, rounds, warmup)
        out[bs] = {name: pair(times[name], times[base]) for name, base in baselines.items()}
    return out


def latency_input(batch: int, shape: Sequence[int], device: torch.device) -> Tensor:
    """A random input batch of one sample ``shape`` (``C, H, W``), channels_last when it is an image batch."""
    x = torch.randn((batch, *shape), device=device)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
