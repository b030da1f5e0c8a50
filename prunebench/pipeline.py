"""One ``prunebench run``: a recipe expanded into cells (methods x seeds x targets), each run through

    dense (cached per seed) -> sparsity training -> prune to target -> fine-tune -> measure -> MLflow

Every cell of a seed starts from the same dense checkpoint, sees the same data order and gets the same
number of training epochs in every stage (methods without sparsity training get plain training: the
matched budget of design.md). The test split is read only for final metrics.
"""

from __future__ import annotations

import copy
import json
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebench import cache, tracking
from prunebench.data import DataModule, load_data
from prunebench.engine import prune_to_target
from prunebench.groups import build_groups
from prunebench.errors import UserError
from prunebench.measure import count_macs, measure_latency
from prunebench.method import Calibration
from prunebench.models import create_model
from prunebench.recipe import Recipe, Schedule, dump_recipe, method_label
from prunebench.registry import build_method
from prunebench.serialize import save_pruned
from prunebench.train import DivergedError, EpochStats, evaluate, prepare_model, resolve_device, seed_everything, train

_STAGE_CODE = {"dense": 1, "sparsity": 2, "between": 3, "finetune": 4}


@dataclass
class CellResult:
    """The final figures of one cell (what the closing table prints)."""

    method: str
    seed: int
    target: float
    run_id: str
    status: str = "FINISHED"
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class RunSummary:
    parent_run_id: str
    experiment: str
    tracking_uri: str
    cells: list[CellResult]

    @property
    def failed(self) -> list[CellResult]:
        return [c for c in self.cells if c.status != "FINISHED"]


class Context:
    """What every cell of an invocation shares: the recipe, device, data and a few measurements."""

    def __init__(self, recipe: Recipe, quiet: bool) -> None:
        self.recipe = recipe
        self.quiet = quiet
        self.device = resolve_device(recipe.train.device)
        self.data: DataModule = load_data(recipe.data, self.device)
        self.example = torch.zeros(1, self.data.in_chans, self.data.image_size, self.data.image_size, device=self.device)
        self._dense_latency: dict[int, float] | None = None

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def new_model(self) -> nn.Module:
        model = create_model(self.recipe.model, num_classes=self.data.num_classes, in_chans=self.data.in_chans)
        return prepare_model(model, self.device, self.recipe.train)

    def batches_for(self, seed: int, stage: str):
        """Epoch -> that epoch's training batches; a pure function of (seed, stage, epoch)."""
        bs = self.recipe.data.batch_size

        def batches(epoch: int):
            g = torch.Generator().manual_seed(seed * 1_000_003 + _STAGE_CODE[stage] * 10_007 + epoch)
            return self.data.train_batches(bs, g)

        return batches

    def val_fn(self, model: nn.Module) -> float | None:
        if self.data.split_sizes().get("val", 0) == 0:
            return None
        return evaluate(model, self.data.eval_batches("val"), self.recipe.train)

    def dense_latency(self, model: nn.Module) -> dict[int, float]:
        if self._dense_latency is None:
            self._dense_latency = self.latency(model)
        return self._dense_latency

    def latency(self, model: nn.Module) -> dict[int, float]:
        m = self.recipe.measure
        shape = tuple(self.example.shape[1:])
        return measure_latency(model, shape, self.device, batch_sizes=(1, m.latency_batch), warmup=m.warmup,
                               repeats=m.repeats)


def dense_model(ctx: Context, seed: int) -> nn.Module:
    """The dense start of ``seed``: a user checkpoint, the cache, or trained now (then cached)."""
    recipe = ctx.recipe
    model = ctx.new_model()
    if recipe.dense.checkpoint:
        path = Path(recipe.dense.checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f"dense.checkpoint {str(path)!r} does not exist; fix the path or remove the key to train")
        state = cache.safe_load(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError) as exc:
            first = str(exc).splitlines()[0][:200]
            raise UserError(f"dense.checkpoint {str(path)!r} does not match model {recipe.model.name!r}: {first}") from None
        ctx.say(f"seed {seed}: dense model from {path}")
        return model
    path = cache.dense_path(recipe, seed)
    with cache.lock_for(path):  # a concurrent run waits here, then reuses the file
        if path.is_file():
            model.load_state_dict(cache.safe_load(path)["state_dict"])
            ctx.say(f"seed {seed}: dense model from cache {path}")
            return model
        ctx.say(f"seed {seed}: training the dense model ({recipe.dense.epochs} epochs, cached as {path})")
        seed_everything(seed)
        train(model, ctx.batches_for(seed, "dense"), recipe.dense, opts=recipe.train, desc=f"dense s{seed}",
              quiet=ctx.quiet)
        cache.atomic_save({"state_dict": model.state_dict(), "key": cache.dense_key(recipe, seed)}, path)
    return model


EpochHook = Callable[[str, EpochStats, int], None]
"""Called after every training epoch of a cell with (stage, stats, global step); may raise to stop."""


def train_and_prune(ctx: Context, dense: nn.Module, macs_dense: float, spec: dict[str, Any], seed: int, target: float,
                    on_epoch: EpochHook | None = None) -> tuple[nn.Module, dict[str, list[int]]]:
    """Sparsity training, pruning to ``target`` and fine-tuning of one cell; returns the model and stage steps.

    Reads only the training and validation splits (``prunebench tune`` relies on that).
    """
    recipe, label = ctx.recipe, method_label(spec)
    method = build_method(spec)
    seed_everything(seed)
    model = copy.deepcopy(dense)
    step = 0
    stages: dict[str, list[int]] = {}

    def run_stage(stage: str, sched: Schedule, with_method: bool) -> None:
        nonlocal step
        if sched.epochs == 0:
            return
        first = step

        def epoch_end(stats: EpochStats, _opt: torch.optim.Optimizer) -> None:
            if on_epoch is not None:
                on_epoch(stage, stats, first + stats.epoch)

        train(model, ctx.batches_for(seed, stage), sched, method=method if with_method else None,
              opts=recipe.train, desc=f"{label} s{seed} t{target} {stage}", quiet=ctx.quiet, val_fn=ctx.val_fn,
              on_epoch_end=epoch_end)
        step = first + sched.epochs
        stages.setdefault(stage, [first, step])[1] = step

    # 1. sparsity training (plain training of the same length for methods without hooks: matched budget)
    _, groups = build_groups(model, ctx.example, scope=recipe.prune.scope, ignored_layers=recipe.prune.ignored_layers)
    method.attach(model, groups)
    run_stage("sparsity", recipe.sparsity, with_method=method.has_sparsity_training())

    # 2. prune to the target in `iterations` steps with fine-tuning in between (targets stay relative to dense)
    calib = None
    if method.uniform:
        g = torch.Generator().manual_seed(seed)
        images = ctx.data.calibration_batch(recipe.prune.calib_images, g)
        calib = Calibration(model=model, batches=list(images.split(recipe.data.eval_batch_size)))
    k = recipe.prune.iterations
    for j in range(1, k + 1):
        result = prune_to_target(model, method, target * j / k, ctx.example, reference_macs=macs_dense,
                                 scope=recipe.prune.scope, max_layer_ratio=recipe.prune.max_layer_ratio,
                                 ignored_layers=recipe.prune.ignored_layers, calib=calib, round_to=recipe.prune.round_to)
        ctx.say(f"  {label} s{seed} t{target}: pruned step {j}/{k} -> {result.macs_reduction:.3f} fewer MACs "
                f"({result.seconds:.1f} s)")
        if j < k:
            run_stage("between", recipe.finetune.model_copy(update={"epochs": recipe.prune.epochs_between}), False)

    # 3. fine-tune (identical schedule for every method, no regularizer)
    run_stage("finetune", recipe.finetune, with_method=False)
    return model, stages


def _log_epoch(stage: str, stats: EpochStats, step: int) -> None:
    tracking.log_epoch({"train_loss": stats.train_loss, "train_penalty": stats.train_penalty,
                        "train_top1": stats.train_top1, "val_top1": stats.val_top1, "lr": stats.lr}, step=step)


def run_cell(ctx: Context, dense: nn.Module, dense_metrics: dict[str, Any], spec: dict[str, Any], seed: int,
             target: float) -> dict[str, float]:
    """One cell inside its MLflow child run: train and prune, then measure and log everything."""
    recipe, label = ctx.recipe, method_label(spec)
    model, stages = train_and_prune(ctx, dense, dense_metrics["macs_dense"], spec, seed, target, on_epoch=_log_epoch)
    tracking.set_tags({tracking.STAGES_TAG: json.dumps(stages)})

    report = count_macs(model, ctx.example)
    latency = ctx.latency(model)
    dense_lat = ctx.dense_latency(dense)
    big = recipe.measure.latency_batch
    metrics = {
        "test_top1": evaluate(model, ctx.data.eval_batches("test"), recipe.train),
        "val_top1": ctx.val_fn(model),
        "dense_test_top1": dense_metrics["dense_test_top1"],
        "macs": report.macs,
        "macs_conv_fc": report.macs_conv_fc,
        "macs_dense": dense_metrics["macs_dense"],
        "macs_conv_fc_dense": dense_metrics["macs_conv_fc_dense"],
        "macs_reduction": 1 - report.macs / dense_metrics["macs_dense"],
        "params": report.params,
        "params_dense": dense_metrics["params_dense"],
        "params_reduction": 1 - report.params / dense_metrics["params_dense"],
        "latency_ms": latency[1],
        "latency_ms_batch": latency[big],
        "dense_latency_ms": dense_lat[1],
        "dense_latency_ms_batch": dense_lat[big],
        "speedup": dense_lat[big] / latency[big],
    }
    tracking.log_final(metrics)
    before = {r["name"]: r for r in dense_metrics["_layers"]}
    rows = [
        {"layer": r["name"], "type": r["type"],
         "in_before": before.get(r["name"], r)["in_channels"], "out_before": before.get(r["name"], r)["out_channels"],
         "in_after": r["in_channels"], "out_after": r["out_channels"],
         "macs_before": before.get(r["name"], r)["macs"], "macs_after": r["macs"]}
        for r in report.per_layer
    ]
    tracking.log_text(tracking.rows_to_csv(rows), "layers.csv")
    out = cache.workdir(recipe) / "pruned" / re.sub(r"[^\w.=-]+", "_", f"{label}-s{seed}-t{target}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_pruned(model, out)
    tracking.log_file(out, "model")
    return {k: v for k, v in metrics.items() if v is not None}


def run_recipe(recipe: Recipe, *, quiet: bool = False) -> RunSummary:
    """Run every cell of ``recipe``; a failing cell is marked FAILED and the others still run."""
    import mlflow

    uri = tracking.connect(recipe.tracking.uri, recipe.experiment)  # fail before any training
    ctx = Context(recipe, quiet)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: list[CellResult] = []
    with tracking.parent_run(recipe.name, f"{recipe.name}-{stamp}", dump_recipe(recipe)) as parent:
        tracking.log_text(json.dumps({"device": str(ctx.device), **ctx.data.split_sizes()}), "data.json")
        for seed in recipe.seed_list:
            dense = dense_model(ctx, seed)
            d_report = count_macs(dense, ctx.example)
            dense_metrics = {
                "dense_test_top1": evaluate(dense, ctx.data.eval_batches("test"), recipe.train),
                "macs_dense": d_report.macs,
                "macs_conv_fc_dense": d_report.macs_conv_fc,
                "params_dense": d_report.params,
                "_layers": d_report.per_layer,
            }
            ctx.say(f"seed {seed}: dense test top-1 {dense_metrics['dense_test_top1']:.4f}, "
                    f"{d_report.macs / 1e6:.1f} M MACs, {d_report.params / 1e6:.3f} M params")
            for spec in recipe.methods:
                for target in recipe.prune.targets:
                    label = method_label(spec)
                    params = {"method": spec["name"], "method_label": label, "seed": seed, "target": target,
                              "model": recipe.model.name, "dataset": recipe.data.name,
                              "scope": recipe.prune.scope, "iterations": recipe.prune.iterations,
                              **{f"method.{k}": v for k, v in spec.items() if k != "name"}}
                    with tracking.cell_run(f"{label}-s{seed}-t{target}", params, recipe.name) as run:
                        cell = CellResult(label, seed, target, run.info.run_id)
                        try:
                            cell.metrics = run_cell(ctx, dense, dense_metrics, spec, seed, target)
                        except (UserError, KeyboardInterrupt):
                            raise
                        except Exception as exc:  # isolate the failure: mark this cell, run the others
                            cell.status = "FAILED"
                            cell.error = f"{type(exc).__name__}: {exc}"
                            kind = "diverged" if isinstance(exc, DivergedError) else "error"
                            tracking.set_tags({"prunebench.error": cell.error[:4000], "prunebench.failure": kind})
                            tracking.log_text(traceback.format_exc(), "traceback.txt")
                            mlflow.end_run(status="FAILED")
                            ctx.say(f"  {label} s{seed} t{target}: FAILED ({cell.error})")
                        results.append(cell)
        summary = RunSummary(parent.info.run_id, recipe.experiment, uri, results)
    return summary


def format_summary(summary: RunSummary) -> str:
    """The closing table of ``prunebench run`` (one line per cell)."""
    head = f"{'method':<24} {'seed':>4} {'target':>6} {'top1':>7} {'d.top1':>7} {'MACs(M)':>9} {'red.':>6} {'params(M)':>9} {'speedup':>7}"
    lines = [head, "-" * len(head)]
    for c in summary.cells:
        m = c.metrics
        if c.status != "FINISHED":
            lines.append(f"{c.method:<24} {c.seed:>4} {c.target:>6.2f}  {c.status}: {c.error}")
            continue
        lines.append(
            f"{c.method:<24} {c.seed:>4} {c.target:>6.2f} {100 * m['test_top1']:>6.2f}% {100 * m['dense_test_top1']:>6.2f}% "
            f"{m['macs'] / 1e6:>9.2f} {m['macs_reduction']:>6.3f} {m['params'] / 1e6:>9.3f} {m['speedup']:>6.2f}x"
        )
    lines.append(f"\nMLflow: {summary.tracking_uri}  experiment {summary.experiment!r}  parent run {summary.parent_run_id}")
    lines.append("Compare: prunebench compare --experiment " + repr(summary.experiment))
    return "\n".join(lines)
