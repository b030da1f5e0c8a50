"""The training of one cell after its dense start -- sparsity training, pruning to the target (in
``prune.iterations`` steps, with training between them) and fine-tuning -- checkpointed after every epoch
and pruning step so that a resumed cell ends exactly as an uninterrupted one. :data:`CONTROL` runs the same
stages without a method or a cut (a seed's dense control). No MLflow here: the caller logs through
``on_epoch``. See docs/fairness.md (matched budgets) and docs/architecture.md (checkpoints, resume)."""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebench import cache, distributed
from prunebench.cache import TrainingCheckpoint
from prunebench.commands.run.context import Context
from prunebench.engine import prune_to_target
from prunebench.groups import PrunableGroup, build_groups
from prunebench.method import Calibration, PruningMethod
from prunebench.recipe import Recipe, Schedule, method_label
from prunebench.registry import build_method
from prunebench.serialize import apply_pruned, pruned_payload
from prunebench.signals import signals_held
from prunebench.sparsity import SparsityMonitor
from prunebench.train import EpochStats, make_optimizer, prepare_model, seed_everything, train

CONTROL = {"name": "dense_control"}
"""The spec of a seed's dense control: the dense model trained on, unpruned, through the cells' stages."""
CONTROL_LABEL = "dense (same epochs)"
log = logging.getLogger(__name__)

EpochHook = Callable[[str, EpochStats, int], None]
"""Called after every training epoch of a cell with (stage, stats, global step); may raise to stop."""


def label(spec: dict[str, Any]) -> str:
    """How a cell's method (or the dense control) is named in run names, messages and tables."""
    return CONTROL_LABEL if spec == CONTROL else method_label(spec)


@dataclass(frozen=True)
class Phase:
    """One step of a cell after the dense start: a training stage or a pruning step."""

    stage: str  # sparsity | prune | between | finetune
    sched: Schedule | None = None  # training phases
    with_method: bool = False  # training phases: the method's sparsity hooks run
    iteration: int = 0  # prune phases: step j of k


def cell_phases(recipe: Recipe, method: PruningMethod, *, prune: bool = True) -> list[Phase]:
    """Sparsity training, ``iterations`` pruning steps with fine-tuning between them, fine-tuning.

    Between pruning steps the regularized methods keep their regularizer on, all alike (OICSR's iterative
    procedure). ``prune=False`` gives the dense control's phases: the same training stages, no cut.
    """
    reg = method.has_sparsity_training()
    phases = [Phase("sparsity", recipe.sparsity, reg)]
    k = recipe.prune.iterations
    between = recipe.finetune.model_copy(update={"epochs": recipe.prune.epochs_between})
    for j in range(1, k + 1):
        if prune:
            phases.append(Phase("prune", iteration=j))
        if j < k:
            phases.append(Phase("between", between, reg))
    phases.append(Phase("finetune", recipe.finetune))
    return phases


@dataclass
class CellCheckpoints:
    """Where one cell checkpoints (``path``), and for which cell and MLflow run: a checkpoint is resumed
    only by the run that wrote it. Under ``torchrun`` rank 0 alone reads (and sends the others), writes and
    clears the checkpoint."""

    path: Path
    key: str
    run_id: str | None = None

    def latest(self) -> TrainingCheckpoint | None:
        ck = TrainingCheckpoint.read(self.path) if distributed.is_main() else None
        ck = distributed.broadcast_object(ck)
        return ck if ck is not None and ck.kind == "cell" and ck.key == self.key and ck.run_id == self.run_id else None

    def save(
        self,
        model: nn.Module,
        phase: int,
        stage: str,
        epoch: int,
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not distributed.is_main():
            return
        TrainingCheckpoint(
            "cell",
            self.key,
            phase,
            stage,
            epoch,
            step,
            self.run_id,
            optimizer=optimizer.state_dict() if optimizer is not None else None,
        ).save(model, self.path)

    def clear(self) -> None:
        if not distributed.is_main():
            return
        shutil.rmtree(self.path.parent, ignore_errors=True)


def _resume_point(checkpoints: CellCheckpoints | None, phases: list[Phase]) -> TrainingCheckpoint | None:
    """The cell's checkpoint if there is a usable one (written by this run for this cell and schedule)."""
    start = checkpoints.latest() if checkpoints is not None else None
    if start is not None and not (0 <= start.phase < len(phases) and phases[start.phase].stage == start.stage):
        log.info("  ignoring %s: it does not fit this recipe's stages", checkpoints.path if checkpoints else "")
        return None
    return start


def train_and_prune(
    ctx: Context,
    dense: nn.Module,
    macs_dense: float,
    spec: dict[str, Any],
    seed: int,
    target: float,
    on_epoch: EpochHook | None = None,
    *,
    checkpoints: CellCheckpoints | None = None,
) -> tuple[nn.Module, dict[str, list[int]]]:
    """Sparsity training, pruning to ``target`` and fine-tuning of one cell; returns the model and stage steps.

    Reads only the training and validation splits (``prunebench tune`` relies on that). With
    ``checkpoints`` every epoch and pruning step ends with a checkpoint, and a checkpoint already there
    (written by the same run) is where the cell continues: earlier phases are skipped, the model, the
    optimizer and the RNG states are restored, so the rest runs exactly as it would have.

    A regularized method's sparsity-stage epochs carry the diagnostics of :mod:`prunebench.sparsity` in
    ``stats.diagnostics`` (and its last epoch the norms record in ``stats.norms``). ``spec`` =
    :data:`CONTROL` trains the dense control: the same stages and data, no method, no cut.
    """
    control = spec == CONTROL
    recipe = ctx.recipe
    where = f"{CONTROL_LABEL} s{seed}" if control else f"{method_label(spec)} s{seed} t{target}"
    method = PruningMethod() if control else build_method(spec)
    phases = cell_phases(recipe, method, prune=not control)
    seed_everything(seed)
    start = _resume_point(checkpoints, phases)
    if start is not None:
        log.info("  %s: resuming from its %s", where, start.describe())
    model, calib, dense_groups = _cell_setup(ctx, dense, method, seed, start, checkpoints)
    widths = {g.name: g.size for g in dense_groups}
    steps = ctx.steps_per_epoch

    step = 0
    stages: dict[str, list[int]] = {}
    for i, phase in enumerate(phases):
        done_before = start is not None and i <= start.phase
        if phase.sched is None:  # a pruning step
            if not done_before:
                _prune_step(ctx, model, method, phase.iteration, target, macs_dense, calib, where, widths)
                if checkpoints is not None:
                    checkpoints.save(model, i, phase.stage, -1, step)
            continue
        first = step
        step += phase.sched.epochs
        if phase.sched.epochs:
            stages.setdefault(phase.stage, [first, step])[1] = step
        begin, optimizer = 0, None
        if done_before:
            assert start is not None
            if i < start.phase or start.epoch + 1 >= phase.sched.epochs:
                continue
            begin = start.epoch + 1
            optimizer = make_optimizer(model, phase.sched)
            optimizer.load_state_dict(start.optimizer)  # momentum buffers: the next step is the one it would have been
        monitor = None
        if phase.stage == "sparsity" and phase.with_method and phase.sched.epochs:
            # the figures are relative to the start of the stage: the dense model, also when resuming
            monitor = (
                SparsityMonitor.start_of_stage(method, phase.sched, steps)
                if not done_before
                else _dense_monitor(dense, dense_groups, spec, method, phase.sched, steps)
            )

        def epoch_end(
            stats: EpochStats,
            opt: torch.optim.Optimizer,
            i: int = i,
            stage: str = phase.stage,
            first: int = first,
            monitor: SparsityMonitor | None = monitor,
            last: int = phase.sched.epochs - 1,
        ) -> None:
            if monitor is not None:
                stats.diagnostics.update(monitor.epoch_end(stats))
                if stats.epoch == last:
                    stats.norms = monitor.norms_record()
            with signals_held():  # the epoch's metrics and its checkpoint go together
                if on_epoch is not None:
                    on_epoch(stage, stats, first + stats.epoch)
                if checkpoints is not None:
                    checkpoints.save(model, i, stage, stats.epoch, first + stats.epoch + 1, opt)

        train(
            model,
            ctx.batches_for(seed, phase.stage),
            phase.sched,
            method=method if phase.with_method else None,
            opts=recipe.train,
            desc=f"{where} {phase.stage}",
            quiet=ctx.quiet,
            start_epoch=begin,
            optimizer=optimizer,
            val_fn=ctx.val_fn,
            on_epoch_end=epoch_end,
        )
    return model, stages


def _dense_monitor(
    dense: nn.Module,
    dense_groups: list[PrunableGroup],
    spec: dict[str, Any],
    method: PruningMethod,
    sched: Schedule,
    steps: int,
) -> SparsityMonitor | None:
    """A resumed cell's sparsity monitor: the start figures from the dense model, then watching ``method``."""
    probe = build_method(spec)
    probe.attach(dense, dense_groups)
    monitor = SparsityMonitor.start_of_stage(probe, sched, steps)
    if monitor is not None:
        monitor.method = method
    return monitor


def _cell_setup(
    ctx: Context,
    dense: nn.Module,
    method: PruningMethod,
    seed: int,
    start: TrainingCheckpoint | None,
    checkpoints: CellCheckpoints | None,
) -> tuple[nn.Module, Calibration | None, list[PrunableGroup]]:
    """The cell's model -- a copy of ``dense``, or rebuilt from the checkpoint ``start`` -- with ``method``
    attached to its groups, the calibration images of a uniform (ThiNet-like) method, and the prunable
    groups of the dense model (their widths cap every pruning step; a resumed sparsity stage starts from them).

    When resuming, the checkpointed weights, buffers and RNG states are put back *after* the tracing
    and set-up, so nothing those do can make the rest of the cell differ from an uninterrupted one.
    """
    recipe = ctx.recipe
    if start is None:
        model = copy.deepcopy(dense)
    else:
        assert checkpoints is not None
        fresh = ctx.new_model()
        model = prepare_model(distributed.load_checkpointed(checkpoints.path, fresh), ctx.device, recipe.train)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()} if start is not None else None
    prune = recipe.prune
    _, groups = build_groups(model, ctx.example, scope=prune.scope, ignored_layers=prune.ignored_layers)
    method.attach(model, groups)
    dense_groups = (
        groups
        if start is None
        else build_groups(dense, ctx.example, scope=prune.scope, ignored_layers=prune.ignored_layers)[1]
    )
    calib = None
    if method.calibrated:
        g = torch.Generator().manual_seed(seed)
        images = ctx.data.calibration_batch(recipe.prune.calib_images, g)
        calib = Calibration(model=model, batches=list(images.split(recipe.data.eval_batch_size)))
    if start is not None and snapshot is not None:
        model.load_state_dict(snapshot)
        cache.set_rng_state(start.rng)  # type: ignore[arg-type]
    return model, calib, dense_groups


def _prune_step(
    ctx: Context,
    model: nn.Module,
    method: PruningMethod,
    j: int,
    target: float,
    macs_dense: float,
    calib: Calibration | None,
    where: str,
    widths: dict[str, int],
) -> None:
    """Pruning step ``j`` of ``k``: to ``target * j / k`` of the dense MACs (targets stay relative to dense).

    Under ``torchrun`` rank 0 plans and cuts; the other ranks take its pruned model (shapes and weights) and
    attach ``method`` to the new groups, as the engine does after a cut.
    """
    prune = ctx.recipe.prune
    k = prune.iterations
    if not distributed.is_main():
        apply_pruned(distributed.broadcast_object(None), model)
        _, fresh = build_groups(model, ctx.example, scope=prune.scope, ignored_layers=prune.ignored_layers)
        method.attach(model, fresh)
        prepare_model(model, ctx.device, ctx.recipe.train)
        return
    result = prune_to_target(
        model,
        method,
        target * j / k,
        ctx.example,
        reference_macs=macs_dense,
        scope=prune.scope,
        max_layer_ratio=prune.max_layer_ratio,
        ignored_layers=prune.ignored_layers,
        calib=calib,
        round_to=prune.round_to,
        dense_widths=widths,
    )
    if distributed.world_size() > 1:
        distributed.broadcast_object(pruned_payload(model))  # every rank cuts the same channels
    prepare_model(model, ctx.device, ctx.recipe.train)  # the cut layers' new weights are contiguous again
    log.info("  %s: pruned step %s/%s -> %.3f fewer MACs (%.1f s)", where, j, k, result.macs_reduction, result.seconds)
