"""``prunebench bench``: the measured speed of the harness itself and of the networks it prunes.

A benchmark harness that wastes compute distorts every budget it reports, and "50% fewer MACs" that is not
faster on the hardware misleads. One run measures, side by side in one process, five figures, each a ratio
or a time, a median over interleaved rounds after a warm-up (so that a load change on a shared machine hits
both sides of a ratio alike):

1. ``loop_efficiency`` -- images/s of :func:`prunebench.train.train` / images/s of a minimal hand-written loop.
2. ``reg_overhead`` -- per method, (plain step + the method's hooks timed alone) / plain step;
   ``reg_overhead_step`` is the end-to-end check.
3. ``data_headroom`` -- batches/s of the augmentation pipeline / batches/s the training step consumes.
4. ``speedup`` -- per method at the MACs target with the default plan (``prune.round_to: auto``), dense
   latency / pruned latency at batch 1 and at the bench batch, next to ``macs_ratio``;
   ``speedup_efficiency = speedup / macs_ratio``; ``*_exact`` with the widths as pruned (no target); the same
   models in ONNX Runtime (``onnx_speedup``, ``onnx_efficiency``) and compiled (``compiled_speedup``), timed in
   the same rounds, and where the dense model's batch-1 forward spends its time.
5. ``engine_s``, ``thinet_s``, ``macs_count_s`` -- seconds of one prune-to-target call, of ThiNet's selection
   and reconstruction, and of one fvcore count.

Each figure is checked against its target (:mod:`~prunebench.commands.bench.targets`, where every timing
budget of the project lives); a missed target gets a profile that says why. The modules: ``config``
(:class:`BenchConfig`), ``workload`` (the shared set-up), ``figures``, ``deployment`` (ONNX Runtime,
torch.compile, the batch-1 breakdown), ``targets``, ``profiles``, ``machine``, ``report`` and ``runner``
(:func:`run_bench`); the timing is :mod:`prunebench.timing`. The command line is :mod:`prunebench.cli.bench`.
See docs/architecture.md; the measured reports are in reports/perf/.
"""

from prunebench.commands.bench.config import BenchConfig
from prunebench.commands.bench.figures import Measurements
from prunebench.commands.bench.machine import machine_info, report_name
from prunebench.commands.bench.report import (
    BenchReport,
    build_report,
    format_checks,
    render_markdown,
    write_report,
)
from prunebench.commands.bench.runner import check_config, run_bench
from prunebench.commands.bench.targets import TARGETS, Check, Target, check_targets
from prunebench.timing import (
    interleaved,
    is_noisy,
    median,
    paired_ratio,
    spread,
    torch_threads,
)

__all__ = [
    "TARGETS",
    "BenchConfig",
    "BenchReport",
    "Check",
    "Measurements",
    "Target",
    "build_report",
    "check_config",
    "check_targets",
    "format_checks",
    "interleaved",
    "is_noisy",
    "machine_info",
    "median",
    "paired_ratio",
    "render_markdown",
    "report_name",
    "run_bench",
    "spread",
    "torch_threads",
    "write_report",
]
