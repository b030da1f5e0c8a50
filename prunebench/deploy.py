"""Deployment: ONNX export and ONNX Runtime inference.

A pruned model's eager latency says what PyTorch makes of the smaller tensors; an inference engine fuses
and re-lays out the graph and may gain more (or less) from the cut. This module gives the ONNX Runtime
side: :func:`export_onnx` writes a float32, CPU, eval-mode copy of a model with a dynamic batch dimension
(the dynamo exporter, the deprecated TorchScript exporter once if that fails, :class:`ExportError` with a
one-line reason if both do), :class:`OrtModel` runs the file with the threads PyTorch uses, and
:func:`check_outputs` compares the two on one batch.

The exporters are loud (progress prints, graph dumps on failure, warnings, INFO logs from onnxscript and
a C++ log written straight to file descriptor 1); all of it is silenced here so the caller's logs stay
its own. Inputs come from private seeded generators: exporting or checking never moves the global RNGs
a cell's training depends on.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn
from torch.export import Dim

from prunebench.errors import native_output_silenced, one_line
from prunebench.files import atomic_write

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"
EXPORT_BATCH = 3
"""Batch size of the example input the graph is traced with: not 1 (torch.export specializes sizes 0 and
1) and not the default batch of :func:`check_outputs`, so a graph that froze its batch size fails the check."""

_CHATTY = ("torch", "onnxscript", "onnx_ir", "onnx")  # loggers whose records are exporter chatter
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REASON_CHARS = 200  # per exporter in an ExportError message


class ExportError(RuntimeError):
    """A model could not be exported to ONNX, or its ONNX outputs differ from PyTorch's; the message is one
    short line naming the cause (it goes into an MLflow tag)."""


# -- export ----------------------------------------------------------------------------------------


def export_onnx(model: nn.Module, sample_shape: Sequence[int], path: str | Path) -> Path:
    """Export ``model`` to ONNX at ``path`` (written atomically) and return the path.

    ``sample_shape`` is one sample's shape (``C, H, W``); the batch dimension is dynamic. A float32 CPU
    copy in eval mode is exported, so the caller's model keeps its mode, device, dtype and memory format.
    The dynamo exporter is tried first, then the TorchScript exporter; the file is checked with
    ``onnx.checker``. Raises :class:`ExportError` naming each exporter's root cause when neither works.
    """
    path = Path(path)
    net = _export_copy(model)
    x = _sample(EXPORT_BATCH, sample_shape)
    reasons: list[str] = []
    for name, exporter in (("dynamo", _export_dynamo), ("TorchScript", _export_torchscript)):
        try:
            proto = exporter(net, x)
            onnx.checker.check_model(proto)
        except Exception as exc:  # an exporter fails in many ways (export, conversion, checker); try the next
            reasons.append(f"{name}: {_root_cause(exc)}")
        else:
            break
    else:
        raise ExportError("ONNX export failed; " + "; ".join(reasons))
    if reasons:
        log.info("the dynamo exporter failed on %s (%s); exported with the TorchScript exporter", path.name, reasons[0])
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return path


def _export_copy(model: nn.Module) -> nn.Module:
    """The copy that is exported and checked against: CPU, float32, contiguous (NCHW), eval mode."""
    net = copy.deepcopy(model).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
    return net.eval()


def _sample(batch: int, sample_shape: Sequence[int]) -> Tensor:
    """A random float32 batch from a private generator (the global RNG is left alone)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, *(int(d) for d in sample_shape)), generator=gen)


def _export_dynamo(net: nn.Module, x: Tensor) -> onnx.ModelProto:
    with _quiet():
        program = torch.onnx.export(
            net,
            (x,),
            dynamo=True,
            dynamic_shapes=({0: Dim("batch")},),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
            report=False,
        )
        return program.model_proto


def _export_torchscript(net: nn.Module, x: Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    log_enabled = torch._C._jit_is_onnx_log_enabled()
    try:
        with _quiet(), native_output_silenced():
            torch.onnx.export(
                net,
                (x,),
                buffer,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                verbose=False,
            )
    finally:  # torch turns its C++ ONNX log on during this export and never turns it off again
        torch._C._jit_set_onnx_log_enabled(log_enabled)
    return onnx.load_from_string(buffer.getvalue())


def _root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost exception in ``exc``'s chain: the exporters wrap the real cause
    (the operator without an ONNX function, the data-dependent branch) in pages of advice."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            break
        exc = inner
    text = " ".join(_ANSI.sub("", one_line(exc, 1000)).split())
    return f"{type(exc).__name__}: {text}"[:_REASON_CHARS]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence an export: warnings, the exporters' Python prints to stdout/stderr, and the log records of
    torch, onnxscript and onnx (torch sets levels on many of its own loggers, so each one is raised)."""
    loggers = [logging.getLogger(name) for name in _CHATTY]
    loggers += [
        lg
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and name.split(".")[0] in _CHATTY
    ]
    levels = [(lg, lg.level) for lg in loggers]
    for lg, _ in levels:
        lg.setLevel(logging.CRITICAL + 1)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in levels:
            lg.setLevel(level)


# -- inference -------------------------------------------------------------------------------------


class OrtModel:
    """An ONNX Runtime session on an exported model, set up like the eager model it is timed against.

    ``intra_op_num_threads`` is ``torch.get_num_threads()`` at construction (one operator at a time, no
    inter-op pool), so eager and ONNX timings use the same threads, and they do not spin between runs; all
    graph optimizations are on. On a
    CUDA ``device`` the CUDA execution provider comes first when this onnxruntime has it, else the session
    runs on the CPU (one warning): ``providers`` says which ran.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no notes about unused initializers or EP placement
        # no busy-waiting between runs: ORT's spinning threads would steal the cores from the eager model
        # timed next in the same round (prunebench.timing.interleaved)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        device = torch.device(device)
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                log.warning("onnxruntime has no CUDA execution provider here; %s runs on the CPU", self.path.name)
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        self.providers: list[str] = self.session.get_providers()
        self.input_name: str = self.session.get_inputs()[0].name
        self.output_name: str = self.session.get_outputs()[0].name
        self._device_id = device.index or 0
        self._on_cuda = self.providers[0] == "CUDAExecutionProvider"

    @property
    def threads(self) -> int:
        """The session's intra-op thread count."""
        return int(self.session.get_session_options().intra_op_num_threads)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's input shape (the dims after the batch), as exported."""
        dims = self.session.get_inputs()[0].shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise ExportError(f"{self.path.name}: input has dynamic dims besides the batch ({dims})")
        return tuple(dims)

    def __call__(self, x: Tensor | np.ndarray) -> np.ndarray:
        """The first output on ``x`` (a batch; a tensor is copied to a contiguous float32 CPU array)."""
        if isinstance(x, Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def timed_call(self, batch: int) -> Callable[[], object]:
        """A zero-argument callable running one random batch of ``batch`` samples, for timing.

        The input is made and placed once, outside the callable (on the GPU for a CUDA session, through an
        IOBinding, so no host copy is timed); each call is one synchronous ``run``.
        """
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, *self.sample_shape), dtype=np.float32)
        device = "cuda" if self._on_cuda else "cpu"
        value = ort.OrtValue.ortvalue_from_numpy(x, device, self._device_id)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, value)
        binding.bind_output(self.output_name, device, self._device_id)
        session = self.session

        def call() -> object:
            session.run_with_iobinding(binding)
            return value  # keeps the input alive with the callable

        return call


def check_outputs(
    model: nn.Module,
    ort_model: OrtModel,
    sample_shape: Sequence[int],
    batch: int = 2,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> float:
    """The largest absolute difference between PyTorch's and ONNX Runtime's outputs on one random batch.

    PyTorch runs the same float32 CPU eval copy that :func:`export_onnx` exports, without autograd (the
    caller's model is left alone). Raises :class:`ExportError` when the outputs' shapes differ or are not
    within ``atol + rtol * |pytorch|`` everywhere. Meant for a CPU session: a CUDA one may compute in TF32.
    """
    x = _sample(batch, sample_shape)
    with torch.no_grad():
        out = _export_copy(model)(x)
    expected = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    got = ort_model(x)
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    if not np.allclose(got, expected, atol=atol, rtol=rtol):
        raise ExportError(
            f"ONNX outputs differ from PyTorch's: max abs difference {diff:.3g} (atol {atol:g}, rtol {rtol:g})"
        )
    return diff


def deploy(
    model: nn.Module,
    sample_shape: Sequence[int],
    path: str | Path,
    device: str | torch.device = "cpu",
    check: bool = True,
) -> OrtModel:
    """``model`` exported to ``path`` and opened in ONNX Runtime (with ``check``, its outputs compared with
    PyTorch's); any of these failing is an :class:`ExportError`, ONNX Runtime's own exception types included."""
    exported = export_onnx(model, sample_shape, path)
    try:
        ort_model = OrtModel(exported, device)
        if check:
            check_outputs(model, ort_model, sample_shape)
    except ExportError:
        raise
    except Exception as exc:  # ONNX Runtime refused or failed the exported graph
        raise ExportError(f"ONNX Runtime could not run the exported model: {one_line(exc, 300)}") from exc
    return ort_model
