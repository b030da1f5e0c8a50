"""One cell of the grid (or a seed's dense control) inside its own MLflow child run: trained and pruned by
:func:`~prunebench.commands.run.phases.train_and_prune`, then measured (test accuracy, MACs, parameters, and
speed against the dense model in eager PyTorch and ONNX Runtime: :mod:`~prunebench.commands.run.latency`) and
logged with its per-layer table, pruned model and ONNX file. A cell that raises is marked FAILED and the grid
goes on -- except under ``torchrun``, where the other ranks may be waiting in a collective: the job stops, and
``--resume`` continues the cell from its last checkpoint. Names of what is logged: :mod:`prunebench.tracking.schema`
(docs/tracking.md)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from torch import nn

from prunebench import cache, distributed
from prunebench.commands.run.context import Context
from prunebench.commands.run.dense import DenseStart
from prunebench.commands.run.latency import measure_speed
from prunebench.commands.run.phases import CONTROL, CellCheckpoints, label, train_and_prune
from prunebench.commands.run.summary import CellResult
from prunebench.errors import one_line
from prunebench.files import atomic_save
from prunebench.measure import count_macs
from prunebench.recipe import Recipe, method_label
from prunebench.serialize import pruned_payload
from prunebench.tracking import runs, schema
from prunebench.train import EpochStats, evaluate

log = logging.getLogger(__name__)


def _log_epoch(stage: str, stats: EpochStats, step: int) -> None:
    runs.log_epoch(schema.epoch_metrics(stats), step=step)
    if stats.norms is not None:
        runs.log_text(json.dumps(stats.norms), schema.NORMS_ARTIFACT)


def _last_step(stages: dict[str, list[int]]) -> int:
    """The cell's last epoch: final metrics are logged there, so per-epoch val_top1 ends on the final value."""
    return max((end for _, end in stages.values()), default=1) - 1


def run_cell(
    ctx: Context,
    dense: nn.Module,
    dense_metrics: dict[str, Any],
    spec: dict[str, Any],
    seed: int,
    target: float,
    *,
    checkpoints: CellCheckpoints | None = None,
) -> dict[str, float]:
    """One cell inside its MLflow child run: train and prune, then measure and log everything."""
    recipe = ctx.recipe
    diagnostics: dict[str, float] = {}

    def on_epoch(stage: str, stats: EpochStats, step: int) -> None:
        _log_epoch(stage, stats, step)
        diagnostics.update(stats.diagnostics)

    model, stages = train_and_prune(
        ctx, dense, dense_metrics["macs_dense"], spec, seed, target, on_epoch=on_epoch, checkpoints=checkpoints
    )
    if not distributed.is_main():  # rank 0 measures, logs and saves; the others go on to the next cell
        return dict(diagnostics)
    runs.set_tags({schema.STAGES_TAG: json.dumps(stages)})

    report = count_macs(model, ctx.example)
    # one folder per run: concurrent invocations of the same recipe never write the same file
    run_folder = checkpoints.run_id if checkpoints is not None and checkpoints.run_id else "latest"
    name = re.sub(r"[^\w.=-]+", "_", f"{method_label(spec)}-s{seed}-t{target}")
    out = cache.workdir(recipe) / "pruned" / run_folder
    speed = measure_speed(ctx, dense, model, seed, out / f"{name}.onnx")
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
        **speed.metrics,
    }
    runs.log_final(metrics, step=_last_step(stages))
    runs.set_tags(speed.tags)
    before = {r["name"]: r for r in dense_metrics["_layers"]}
    rows = [
        {
            "layer": r["name"],
            "type": r["type"],
            "in_before": before.get(r["name"], r)["in_channels"],
            "out_before": before.get(r["name"], r)["out_channels"],
            "in_after": r["in_channels"],
            "out_after": r["out_channels"],
            "macs_before": before.get(r["name"], r)["macs"],
            "macs_after": r["macs"],
        }
        for r in report.per_layer
    ]
    runs.log_text(runs.rows_to_csv(rows), schema.LAYERS_ARTIFACT)
    atomic_save(pruned_payload(model), out / f"{name}.pt")
    runs.log_file(out / f"{name}.pt", schema.MODEL_ARTIFACT_DIR)
    if speed.onnx_file is not None:
        runs.log_file(speed.onnx_file, schema.ONNX_ARTIFACT_DIR)
    return {**diagnostics, **{k: v for k, v in metrics.items() if v is not None}}


def run_control(
    ctx: Context,
    dense: nn.Module,
    dense_metrics: dict[str, Any],
    seed: int,
    *,
    checkpoints: CellCheckpoints | None = None,
) -> dict[str, float]:
    """The dense control of ``seed`` inside its MLflow child run: the dense model trained on, unpruned, for the
    cells' stages (same schedules, same data order), so that "vs dense (same epochs)" separates what the
    method did from what the extra epochs did."""
    model, stages = train_and_prune(
        ctx, dense, dense_metrics["macs_dense"], CONTROL, seed, 0.0, on_epoch=_log_epoch, checkpoints=checkpoints
    )
    if not distributed.is_main():
        return {}
    runs.set_tags({schema.STAGES_TAG: json.dumps(stages)})
    metrics = {
        "test_top1": evaluate(model, ctx.data.eval_batches("test"), ctx.recipe.train),
        "val_top1": ctx.val_fn(model),
        "dense_test_top1": dense_metrics["dense_test_top1"],
        "macs": dense_metrics["macs_dense"],
        "macs_dense": dense_metrics["macs_dense"],
        "macs_reduction": 0.0,
        "params": dense_metrics["params_dense"],
        "params_dense": dense_metrics["params_dense"],
    }
    runs.log_final(metrics, step=_last_step(stages))
    return {k: v for k, v in metrics.items() if v is not None}


def _launch_params(ctx: Context) -> dict[str, Any]:
    """How many processes train the cell and the images per optimizer step (``torchrun``: docs/tracking.md)."""
    return {schema.WORLD_SIZE_PARAM: distributed.world_size(), schema.GLOBAL_BATCH_PARAM: ctx.global_batch}


def _cell_params(recipe: Recipe, spec: dict[str, Any], seed: int, target: float) -> dict[str, Any]:
    return {
        "method": spec["name"],
        "method_label": method_label(spec),
        "seed": seed,
        "target": target,
        "model": recipe.model.name,
        "dataset": recipe.data.name,
        "scope": recipe.prune.scope,
        "round_to": recipe.prune.round_to,
        "iterations": recipe.prune.iterations,
        **{f"{schema.METHOD_PARAM_PREFIX}{k}": v for k, v in spec.items() if k != "name"},
    }


def _control_params(recipe: Recipe, seed: int) -> dict[str, Any]:
    return {
        "method": CONTROL["name"],
        "method_label": label(CONTROL),
        "seed": seed,
        "model": recipe.model.name,
        "dataset": recipe.data.name,
    }


def run_isolated(
    ctx: Context, start: DenseStart, spec: dict[str, Any], seed: int, target: float, key: str, earlier: Any | None
) -> CellResult:
    """One cell (or, for :data:`CONTROL`, a seed's dense control) in its own MLflow run (reopened when
    ``earlier`` is an unfinished attempt); an exception marks it FAILED and is returned, not raised, so the
    grid goes on. Interrupts propagate."""
    recipe = ctx.recipe
    control = spec == CONTROL
    cell = CellResult(label(spec), seed, target, earlier.info.run_id if earlier is not None else "", control=control)
    checkpoints: CellCheckpoints | None = None
    params = _control_params(recipe, seed) if control else _cell_params(recipe, spec, seed, target)
    params.update(_launch_params(ctx))
    name = f"dense_control-s{seed}" if control else f"{cell.method}-s{seed}-t{target}"
    try:
        with runs.cell_run(
            name,
            params,
            recipe.name,
            cell_key=key,
            run_id=cell.run_id or None,
            kind=schema.CONTROL_KIND if control else schema.CELL_KIND,
        ) as run:
            cell.run_id = run.info.run_id
            checkpoints = CellCheckpoints(cache.cell_checkpoint_path(recipe, cell.run_id), key, cell.run_id)
            cell.metrics = (
                run_control(ctx, start.model, start.metrics, seed, checkpoints=checkpoints)
                if control
                else run_cell(ctx, start.model, start.metrics, spec, seed, target, checkpoints=checkpoints)
            )
    except Exception as exc:  # isolate the failure (cell_run marked the run FAILED with the traceback)
        cell.status, cell.error = "FAILED", f"{type(exc).__name__}: {one_line(exc, 500)}"
        log.info("  %s: FAILED (%s)", cell.describe(), cell.error)
        if distributed.world_size() > 1:  # the other ranks may be waiting in a collective: stop the whole job
            raise distributed.RankFailed(
                f"{cell.describe()} failed on rank {distributed.rank()} of {distributed.world_size()} "
                f"({cell.error}); the job stops. Fix the cause and add --resume to the same torchrun command: "
                "finished cells are kept and this one continues from its last checkpoint"
            ) from exc
    else:
        checkpoints.clear()  # type: ignore[union-attr]
    if distributed.world_size() > 1:  # rank 0 measured and logged: its result is every rank's summary
        cell.status, cell.error, cell.metrics = distributed.broadcast_object((cell.status, cell.error, cell.metrics))
    return cell
