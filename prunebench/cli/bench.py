"""``prunebench bench``: the options, their checks, and the product printed on stdout (the targets table).

The work is :func:`prunebench.commands.bench.run_bench`, imported when the command runs (it loads torch and
every model). The option defaults repeat :class:`~prunebench.commands.bench.BenchConfig`'s (tests/test_bench.py
checks that they agree) so that ``prunebench --help`` imports no command. See docs/architecture.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prunebench.errors import UserError

log = logging.getLogger(__name__)

DEFAULTS = {"model": "resnet56_cifar", "batch": 128, "steps": 3, "reps": 5, "round_to": "auto"}
"""The defaults of :class:`~prunebench.commands.bench.BenchConfig` that are options here."""

HELP = """\
figures (each a ratio or a time measured in this one process, median of several repetitions):
  loop_efficiency     images/s of prunebench's train() (data pipeline with augmentation, progress bar,
                      metric accumulation) / images/s of a minimal hand-written loop (same model, batch,
                      SGD, in-memory tensors, no augmentation). Target >= 0.95.
  reg_overhead        per method: time per training step with its hooks (penalty, after_backward,
                      after_step on groups of internal scope) / plain step, as (plain step + hooks
                      timed alone) / plain step. Target <= 1.05 for oicsr, group_lasso, slimming.
                      reg_overhead_step is the end-to-end check (train() with / without the hooks);
                      methods without hooks give its noise floor.
  data_headroom       batches/s the in-memory augmentation pipeline delivers / batches/s the training
                      step consumes. Target >= 10 on CPU.
  speedup             per method at the MACs target, pruned with the default plan (prune.round_to:
                      auto, the device's vector width; --round-to sets it): dense latency / pruned
                      latency (eval, inference mode, channels_last as in prunebench run) at batch 1
                      (speedup_b1) and at the bench batch; macs_ratio = dense MACs / pruned MACs;
                      speedup_efficiency = speedup / macs_ratio. Target >= 0.8. speedup*_exact: the
                      widths as pruned (round_to 1, labels l1+exact...), no target.
  onnx_speedup        the same models exported to ONNX and run by ONNX Runtime, timed in the same
                      rounds: dense ONNX latency / pruned ONNX latency (onnx_speedup_b1 at batch 1);
                      onnx_efficiency = onnx_speedup / macs_ratio. No target; a model that fails to
                      export has none (the report says why).
  compiled_speedup    the same with torch.compile(dynamic=False) (compiled_speedup_b1 at batch 1);
                      skipped by --no-compile and --quick, or when inductor has no C++ compiler.
                      The report also splits the dense batch-1 forward into convolutions, other
                      operators and the rest (Python, dispatcher) with torch.profiler.
  engine_s            seconds for one prune_to_target call (build groups, score, select, cut, count).
                      Target <= 3 s.
  thinet_s            seconds of ThiNet's selection and reconstruction (calibration images). <= 20 s.
  macs_count_s        seconds of one fvcore MACs count. Target <= 1 s.

These targets are the project's only timing budgets (the tests assert no wall-clock time).
A missed target gets a profile in the Markdown report (torch.profiler operator tables, oneDNN's log
of every convolution on CPU, cProfile for the engine). The report says when the run was noisy.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure the speed of the harness and the real speedup of pruned networks (reports/perf)",
        description="Measure prunebench's own speed and the real speed of pruned networks, against targets; "
        "write <out>/<name>.md and <out>/<name>.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=HELP,
    )
    p.add_argument("--model", default=DEFAULTS["model"], help="CIFAR model name (default: %(default)s)")
    p.add_argument(
        "--batch", type=int, default=DEFAULTS["batch"], help="training and latency batch (default: %(default)s)"
    )
    p.add_argument(
        "--steps", type=int, default=DEFAULTS["steps"], help="training steps per repetition (default: %(default)s)"
    )
    p.add_argument(
        "--reps",
        type=int,
        default=DEFAULTS["reps"],
        help="timed rounds (loop: twice this; regularization: this x steps one-step rounds) (default: %(default)s)",
    )
    p.add_argument(
        "--round-to",
        default=DEFAULTS["round_to"],
        help="the main plan's prune.round_to: auto (the device's vector width) or a channel multiple, 1 = the "
        "widths as pruned; the widths as pruned are also shown, without a target (default: %(default)s)",
    )
    p.add_argument("--out", default="reports/perf", help="output folder (default: %(default)s)")
    p.add_argument("--name", default=None, help="report file name without extension (default: cpu or the GPU model)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument(
        "--quick", action="store_true", help="tiny model (resnet8_cifar), batch 16, few steps, one thread: a smoke test"
    )
    p.add_argument("--no-profile", action="store_true", help="do not profile missed targets")
    p.add_argument(
        "--no-compile", action="store_true", help="no torch.compile figures (compiling takes minutes on a few cores)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages: warnings, errors and the table")


def check_counts(args: argparse.Namespace) -> None:
    """A :class:`UserError` for a count below one or a ``--round-to`` that is neither ``auto`` nor a count;
    ``args.round_to`` becomes ``"auto"`` or an int."""
    for key in ("batch", "steps", "reps"):
        if getattr(args, key) < 1:
            raise UserError(f"bench: --{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    args.round_to = parse_round_to(args.round_to)


def parse_round_to(value: str | int) -> str | int:
    """``auto`` or a channel multiple of at least 1 (1: the widths as pruned)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"bench: --round-to must be auto or an integer at least 1, got {value!r}")
    return n


def command_line(args: argparse.Namespace) -> list[str]:
    """The command that reproduces this run (recorded in the report)."""
    if args.quick:
        rt = [] if args.round_to == DEFAULTS["round_to"] else ["--round-to", str(args.round_to)]
        return ["bench", "--quick", *rt, "--out", str(args.out)]
    argv = [
        "bench",
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--reps",
        str(args.reps),
        "--round-to",
        str(args.round_to),
        "--out",
        str(args.out),
        "--device",
        args.device,
    ]
    argv += ["--no-compile"] if args.no_compile else []
    return argv + (["--threads", str(args.threads)] if args.threads is not None else [])


def run(args: argparse.Namespace) -> int:
    """Run every figure, write the JSON and Markdown reports, print the targets table."""
    from prunebench.commands.bench import (
        BenchConfig,
        format_checks,
        run_bench,
        write_report,
    )

    check_counts(args)
    if args.quick:
        cfg = BenchConfig.quick_config(args.device, not args.no_profile, args.round_to)
    else:
        cfg = BenchConfig(
            model=args.model,
            batch=args.batch,
            steps=args.steps,
            reps=args.reps,
            round_to=args.round_to,
            device=args.device,
            profile=not args.no_profile,
            compile=not args.no_compile,
        )
    report = run_bench(cfg, command=command_line(args), threads=args.threads)
    md, js = write_report(report, Path(args.out), args.name)
    print(format_checks(report.checks))
    log.info("wrote %s and %s", md, js)
    return 0
