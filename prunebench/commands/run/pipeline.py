"""One ``prunebench run``: a recipe expanded into cells (methods x seeds x targets), each run through

    dense (cached per seed) -> sparsity training -> prune to target -> fine-tune -> measure -> MLflow

Every cell of a seed starts from the same dense checkpoint, sees the same data order and gets the same
number of training epochs in every stage (methods without sparsity training get plain training: the
matched budget of docs/design.md). The test split is read only for final metrics.

Reliability (README "Resuming and failures"):

* everything a user can get wrong (data, model, dense checkpoint, workdir, tracking URI) is checked by
  :func:`preflight` and :func:`prunebench.tracking.connect` before any MLflow run or file exists;
* every epoch of every stage, and every pruning step, ends with a checkpoint (:mod:`prunebench.cache`);
  ``--resume`` reopens the latest parent run of the same recipe, skips its FINISHED cells and continues
  the others from their checkpoints in their own runs. A cell's work is a pure function of its seed and
  its checkpoint (data order, learning rate, RNG states, optimizer momentum), so a resumed cell ends
  with the metrics an uninterrupted one would have had;
* a cell that raises or diverges is marked FAILED and the grid goes on; SIGINT/SIGTERM stop the run
  after the current checkpoint is written (:class:`Interrupted`), marking the runs KILLED.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebench import cache
from prunebench.tracking import runs, schema, store
from prunebench.cache import TrainingCheckpoint
from prunebench.data import DataModule, load_data
from prunebench.engine import prune_to_target
from prunebench.errors import DivergedError, UserError
from prunebench.files import atomic_save, file_lock, load_cached, load_torch
from prunebench.signals import Interrupted, handle_signals, signals_held  # noqa: F401  (re-exported)
from prunebench.groups import PrunableGroup, build_groups
from prunebench.measure import count_macs, measure_latency
from prunebench.method import Calibration, PruningMethod
from prunebench.models import create_model
from prunebench.recipe import Recipe, Schedule, dump_recipe, method_label
from prunebench.registry import broken_methods, build_method, get_method
from prunebench.serialize import pruned_payload
from prunebench.sparsity import SparsityMonitor, check_pulls, sparsity_pull, steps_per_epoch
from prunebench.train import (EpochStats, evaluate, make_optimizer, prepare_model, resolve_device,
                              seed_everything, train)

_STAGE_CODE = {"dense": 1, "sparsity": 2, "between": 3, "finetune": 4}
CONTROL = {"name": "dense_control"}
"""The spec of a seed's dense control: the dense model trained on, unpruned, through the cells' stages."""
CONTROL_LABEL = "dense (same epochs)"
log = logging.getLogger("prunebench")


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
    skipped: bool = False  # finished by an earlier invocation (``--resume``)
    control: bool = False  # a seed's dense control, not a cell of the grid

    def describe(self) -> str:
        return f"{CONTROL_LABEL} seed {self.seed}" if self.control else f"{self.method} seed {self.seed} target {self.target}"


@dataclass
class RunSummary:
    parent_run_id: str
    experiment: str
    tracking_uri: str
    cells: list[CellResult]

    @property
    def failed(self) -> list[CellResult]:
        """Cells and dense controls that did not finish."""
        return [c for c in self.cells if c.status != "FINISHED"]

    @property
    def grid(self) -> list[CellResult]:
        """The cells of the grid (methods x seeds x targets), without the dense controls."""
        return [c for c in self.cells if not c.control]


# -- shared context -----------------------------------------------------------------------------------


class Context:
    """What every cell of an invocation shares: the recipe, device, data and a few measurements.

    ``resume``: continue an interrupted dense training from its checkpoint (cells resume by run id).
    """

    def __init__(self, recipe: Recipe, quiet: bool, *, resume: bool = False) -> None:
        self.recipe = recipe
        self.quiet = quiet
        self.resume = resume
        self.device = resolve_device(recipe.train.device)
        self.data: DataModule = load_data(recipe.data, self.device)
        self.example = torch.zeros(1, self.data.in_chans, self.data.image_size, self.data.image_size, device=self.device)
        self._dense_latency: dict[int, float] | None = None

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch of this recipe's data."""
        return steps_per_epoch(self.data.split_sizes()["train"], self.recipe.data.batch_size)

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


def preflight(ctx: Context) -> None:
    """Check what a user can get wrong that the recipe schema cannot see, before any run or file exists:
    the model builds, ``dense.checkpoint`` exists and fits it, the workdir and the tracking store's
    folder are writable. (The data was loaded by :class:`Context`.) Every problem is a :class:`UserError`."""
    model = ctx.new_model()
    if ctx.recipe.dense.checkpoint:
        load_user_checkpoint(ctx.recipe, model)
    cache.check_writable(cache.workdir(ctx.recipe))
    store.check_uri(ctx.recipe.tracking.uri)


def regularizer_pulls(ctx: Context) -> list[tuple[str, float]]:
    """``sparsity_pull`` of every regularized method of the recipe over its sparsity stage, estimated before
    any training: on the cached dense model of the first seed when there is one, else at initialization."""
    recipe = ctx.recipe
    broken = broken_methods()  # a plugin that failed to import fails its own cells, not the recipe
    specs = [s for s in recipe.methods if s["name"] not in broken and get_method(s["name"]).has_sparsity_training()]
    if not specs:
        return []
    seed_everything(recipe.seed_list[0])
    model = ctx.new_model()
    cached = cache.dense_path(recipe, recipe.seed_list[0])
    if recipe.dense.checkpoint:
        load_user_checkpoint(recipe, model)
    elif (payload := load_cached(cached)) is not None:
        model.load_state_dict(payload["state_dict"])
    _, groups = build_groups(model, ctx.example, scope=recipe.prune.scope, ignored_layers=recipe.prune.ignored_layers)
    out = []
    for spec in specs:
        method = build_method(spec)
        try:
            method.attach(model, groups)
            pull = sparsity_pull(method, recipe.sparsity, ctx.steps_per_epoch)
        except Exception as exc:  # a plugin's bug: its cells fail and say why, the others run
            log.warning("warning: could not estimate sparsity_pull of %s (%s: %s)", method_label(spec),
                        type(exc).__name__, exc)
            continue
        if pull is not None:
            out.append((method_label(spec), pull))
    return out


def check_regularizers(ctx: Context) -> None:
    """Warn about every regularized method that cannot act over the recipe's sparsity stage
    (``sparsity_pull`` < 0.5); with ``sparsity.require_pull`` refuse the recipe instead (exit 2)."""
    refused = ctx.recipe.sparsity.require_pull
    problems = check_pulls(regularizer_pulls(ctx), refused=refused)
    if problems and refused:
        raise UserError("; ".join(problems))
    for p in problems:
        log.warning("warning: %s", p)


def load_user_checkpoint(recipe: Recipe, model: nn.Module) -> None:
    """Load ``dense.checkpoint`` (a state dict, or ``{"state_dict": ...}``) into ``model`` with weights_only."""
    path = Path(recipe.dense.checkpoint or "").expanduser()
    if not path.is_file():
        raise UserError(f"dense.checkpoint {str(path)!r} does not exist; fix the path or remove the key to train")
    try:
        state = load_torch(path)
    except Exception as exc:  # not a torch file, or one that needs code to unpickle
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"dense.checkpoint {str(path)!r} cannot be read as a weights-only state dict ({first}); "
                        "save it with torch.save(model.state_dict(), path)") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise UserError(f"dense.checkpoint {str(path)!r} does not match model {recipe.model.name!r}: {first}; "
                        "point it at a state dict of this model") from None


# -- dense start ------------------------------------------------------------------------------------


def dense_model(ctx: Context, seed: int) -> nn.Module:
    """The dense start of ``seed``: a user checkpoint, the cache, or trained now (then cached).

    Training checkpoints every epoch (``<cache>.partial.pt``); with ``ctx.resume`` it continues from there.
    """
    recipe = ctx.recipe
    seed_everything(seed)  # the initial weights are part of what the seed determines
    model = ctx.new_model()
    if recipe.dense.checkpoint:
        load_user_checkpoint(recipe, model)
        ctx.say(f"seed {seed}: dense model from {recipe.dense.checkpoint}")
        return model
    path = cache.dense_path(recipe, seed)
    lock = file_lock(path)
    if not path.is_file() and not _try_acquire(lock):
        ctx.say(f"seed {seed}: another process is training this dense model; waiting to reuse it")
    with lock:  # a concurrent run waits here, then reuses the file
        if (payload := load_cached(path)) is not None:  # a corrupt file is moved aside and trained again
            model.load_state_dict(payload["state_dict"])
            ctx.say(f"seed {seed}: dense model from cache {path}")
            return model
        _train_dense(ctx, model, seed, path)
    return model


def _try_acquire(lock: Any) -> bool:
    """Take ``lock`` if it is free (then release it again); ``False`` when another process holds it."""
    from filelock import Timeout

    try:
        with lock.acquire(timeout=0):
            return True
    except Timeout:
        return False


def _train_dense(ctx: Context, model: nn.Module, seed: int, path: Path) -> None:
    """Train the dense model of ``seed`` (continuing from its partial checkpoint on resume), then cache it."""
    recipe = ctx.recipe
    key, partial = cache.dense_key(recipe, seed), cache.dense_partial_path(recipe, seed)
    start = TrainingCheckpoint.read(partial) if ctx.resume else None
    if start is not None and (start.kind != "dense" or start.key != key):
        start = None
    optimizer = None
    if start is not None:
        prepare_model(start.load_model(partial, model), ctx.device, recipe.train)
        optimizer = make_optimizer(model, recipe.dense)
        optimizer.load_state_dict(start.optimizer)
        cache.set_rng_state(start.rng)  # type: ignore[arg-type]
        ctx.say(f"seed {seed}: resuming the dense model from its {start.describe()}")
    else:
        ctx.say(f"seed {seed}: training the dense model ({recipe.dense.epochs} epochs, cached as {path})")

    def epoch_end(stats: EpochStats, opt: torch.optim.Optimizer) -> None:
        TrainingCheckpoint("dense", key, 0, "dense", stats.epoch, stats.epoch + 1,
                           optimizer=opt.state_dict()).save(model, partial)

    try:
        train(model, ctx.batches_for(seed, "dense"), recipe.dense, opts=recipe.train, desc=f"dense s{seed}",
              quiet=ctx.quiet, start_epoch=start.epoch + 1 if start else 0, optimizer=optimizer, on_epoch_end=epoch_end)
    except DivergedError as exc:  # every cell of the seed would start from it: a recipe problem, not a cell's
        raise UserError(f"dense training of seed {seed} diverged ({exc}); lower dense.lr or add "
                        "dense.warmup_epochs") from exc
    atomic_save({"state_dict": model.state_dict(), "key": key}, path)
    partial.unlink(missing_ok=True)


# -- one cell -----------------------------------------------------------------------------------------

EpochHook = Callable[[str, EpochStats, int], None]
"""Called after every training epoch of a cell with (stage, stats, global step); may raise to stop."""


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
    only by the run that wrote it."""

    path: Path
    key: str
    run_id: str | None = None

    def latest(self) -> TrainingCheckpoint | None:
        ck = TrainingCheckpoint.read(self.path)
        return ck if ck is not None and ck.kind == "cell" and ck.key == self.key and ck.run_id == self.run_id else None

    def save(self, model: nn.Module, phase: int, stage: str, epoch: int, step: int,
             optimizer: torch.optim.Optimizer | None = None) -> None:
        TrainingCheckpoint("cell", self.key, phase, stage, epoch, step, self.run_id,
                           optimizer=optimizer.state_dict() if optimizer is not None else None).save(model, self.path)

    def clear(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def _resume_point(ctx: Context, checkpoints: CellCheckpoints | None, phases: list[Phase]) -> TrainingCheckpoint | None:
    """The cell's checkpoint if there is a usable one (written by this run for this cell and schedule)."""
    start = checkpoints.latest() if checkpoints is not None else None
    if start is not None and not (0 <= start.phase < len(phases) and phases[start.phase].stage == start.stage):
        ctx.say(f"  ignoring {checkpoints.path if checkpoints else ''}: it does not fit this recipe's stages")
        return None
    return start


def train_and_prune(ctx: Context, dense: nn.Module, macs_dense: float, spec: dict[str, Any], seed: int, target: float,
                    on_epoch: EpochHook | None = None, *,
                    checkpoints: CellCheckpoints | None = None) -> tuple[nn.Module, dict[str, list[int]]]:
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
    start = _resume_point(ctx, checkpoints, phases)
    if start is not None:
        ctx.say(f"  {where}: resuming from its {start.describe()}")
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
            monitor = (SparsityMonitor.start_of_stage(method, phase.sched, steps) if not done_before
                       else _dense_monitor(dense, dense_groups, spec, method, phase.sched, steps))

        def epoch_end(stats: EpochStats, opt: torch.optim.Optimizer, i: int = i, stage: str = phase.stage,
                      first: int = first, monitor: SparsityMonitor | None = monitor,
                      last: int = phase.sched.epochs - 1) -> None:
            if monitor is not None:
                stats.diagnostics.update(monitor.epoch_end(stats))
                if stats.epoch == last:
                    stats.norms = monitor.norms_record()
            with signals_held():  # the epoch's metrics and its checkpoint go together
                if on_epoch is not None:
                    on_epoch(stage, stats, first + stats.epoch)
                if checkpoints is not None:
                    checkpoints.save(model, i, stage, stats.epoch, first + stats.epoch + 1, opt)

        train(model, ctx.batches_for(seed, phase.stage), phase.sched, method=method if phase.with_method else None,
              opts=recipe.train, desc=f"{where} {phase.stage}", quiet=ctx.quiet, start_epoch=begin,
              optimizer=optimizer, val_fn=ctx.val_fn, on_epoch_end=epoch_end)
    return model, stages


def _dense_monitor(dense: nn.Module, dense_groups: list[PrunableGroup], spec: dict[str, Any], method: PruningMethod,
                   sched: Schedule, steps: int) -> SparsityMonitor | None:
    """A resumed cell's sparsity monitor: the start figures from the dense model, then watching ``method``."""
    probe = build_method(spec)
    probe.attach(dense, dense_groups)
    monitor = SparsityMonitor.start_of_stage(probe, sched, steps)
    if monitor is not None:
        monitor.method = method
    return monitor


def _cell_setup(ctx: Context, dense: nn.Module, method: PruningMethod, seed: int, start: TrainingCheckpoint | None,
                checkpoints: CellCheckpoints | None) -> tuple[nn.Module, Calibration | None, list[PrunableGroup]]:
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
        model = prepare_model(start.load_model(checkpoints.path, ctx.new_model()), ctx.device, recipe.train)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()} if start is not None else None
    prune = recipe.prune
    _, groups = build_groups(model, ctx.example, scope=prune.scope, ignored_layers=prune.ignored_layers)
    method.attach(model, groups)
    dense_groups = groups if start is None else build_groups(dense, ctx.example, scope=prune.scope,
                                                             ignored_layers=prune.ignored_layers)[1]
    calib = None
    if method.uniform:
        g = torch.Generator().manual_seed(seed)
        images = ctx.data.calibration_batch(recipe.prune.calib_images, g)
        calib = Calibration(model=model, batches=list(images.split(recipe.data.eval_batch_size)))
    if start is not None and snapshot is not None:
        model.load_state_dict(snapshot)
        cache.set_rng_state(start.rng)  # type: ignore[arg-type]
    return model, calib, dense_groups


def _prune_step(ctx: Context, model: nn.Module, method: PruningMethod, j: int, target: float, macs_dense: float,
                calib: Calibration | None, where: str, widths: dict[str, int]) -> None:
    """Pruning step ``j`` of ``k``: to ``target * j / k`` of the dense MACs (targets stay relative to dense)."""
    prune = ctx.recipe.prune
    k = prune.iterations
    result = prune_to_target(model, method, target * j / k, ctx.example, reference_macs=macs_dense, scope=prune.scope,
                             max_layer_ratio=prune.max_layer_ratio, ignored_layers=prune.ignored_layers, calib=calib,
                             round_to=prune.round_to, dense_widths=widths)
    ctx.say(f"  {where}: pruned step {j}/{k} -> {result.macs_reduction:.3f} fewer MACs ({result.seconds:.1f} s)")


def _log_epoch(stage: str, stats: EpochStats, step: int) -> None:
    runs.log_epoch({"train_loss": stats.train_loss, "train_penalty": stats.train_penalty,
                        "train_top1": stats.train_top1, "val_top1": stats.val_top1, "lr": stats.lr,
                        **stats.diagnostics}, step=step)
    if stats.norms is not None:
        runs.log_text(json.dumps(stats.norms), "sparsity_norms.json")


def run_cell(ctx: Context, dense: nn.Module, dense_metrics: dict[str, Any], spec: dict[str, Any], seed: int,
             target: float, *, checkpoints: CellCheckpoints | None = None) -> dict[str, float]:
    """One cell inside its MLflow child run: train and prune, then measure and log everything."""
    recipe, label = ctx.recipe, method_label(spec)
    diagnostics: dict[str, float] = {}

    def on_epoch(stage: str, stats: EpochStats, step: int) -> None:
        _log_epoch(stage, stats, step)
        diagnostics.update(stats.diagnostics)

    model, stages = train_and_prune(ctx, dense, dense_metrics["macs_dense"], spec, seed, target, on_epoch=on_epoch,
                                    checkpoints=checkpoints)
    runs.set_tags({schema.STAGES_TAG: json.dumps(stages)})

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
    last_step = max((end for _, end in stages.values()), default=1) - 1
    runs.log_final(metrics, step=last_step)  # at the last epoch, so per-epoch val_top1 ends on the final value
    before = {r["name"]: r for r in dense_metrics["_layers"]}
    rows = [
        {"layer": r["name"], "type": r["type"],
         "in_before": before.get(r["name"], r)["in_channels"], "out_before": before.get(r["name"], r)["out_channels"],
         "in_after": r["in_channels"], "out_after": r["out_channels"],
         "macs_before": before.get(r["name"], r)["macs"], "macs_after": r["macs"]}
        for r in report.per_layer
    ]
    runs.log_text(runs.rows_to_csv(rows), "layers.csv")
    # one folder per run: concurrent invocations of the same recipe never write the same file
    run_folder = checkpoints.run_id if checkpoints is not None and checkpoints.run_id else "latest"
    out = cache.workdir(recipe) / "pruned" / run_folder / re.sub(r"[^\w.=-]+", "_", f"{label}-s{seed}-t{target}.pt")
    atomic_save(pruned_payload(model), out)
    runs.log_file(out, "model")
    return {**diagnostics, **{k: v for k, v in metrics.items() if v is not None}}


def run_control(ctx: Context, dense: nn.Module, dense_metrics: dict[str, Any], seed: int, *,
                checkpoints: CellCheckpoints | None = None) -> dict[str, float]:
    """The dense control of ``seed`` inside its MLflow child run: the dense model trained on, unpruned, for the
    cells' stages (same schedules, same data order), so that "vs dense (same epochs)" separates what the
    method did from what the extra epochs did."""
    model, stages = train_and_prune(ctx, dense, dense_metrics["macs_dense"], CONTROL, seed, 0.0, on_epoch=_log_epoch,
                                    checkpoints=checkpoints)
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
    last_step = max((end for _, end in stages.values()), default=1) - 1
    runs.log_final(metrics, step=last_step)
    return {k: v for k, v in metrics.items() if v is not None}


# -- the grid ------------------------------------------------------------------------------------------


@dataclass
class _DenseStart:
    model: nn.Module
    metrics: dict[str, Any]


def _dense_start(ctx: Context, seed: int) -> _DenseStart:
    """The dense model of ``seed`` and the figures every cell of that seed reports against."""
    dense = dense_model(ctx, seed)
    report = count_macs(dense, ctx.example)
    metrics = {
        "dense_test_top1": evaluate(dense, ctx.data.eval_batches("test"), ctx.recipe.train),
        "macs_dense": report.macs,
        "macs_conv_fc_dense": report.macs_conv_fc,
        "params_dense": report.params,
        "_layers": report.per_layer,
    }
    ctx.say(f"seed {seed}: dense test top-1 {metrics['dense_test_top1']:.4f}, "
            f"{report.macs / 1e6:.1f} M MACs, {report.params / 1e6:.3f} M params")
    return _DenseStart(dense, metrics)


def _cell_params(recipe: Recipe, spec: dict[str, Any], seed: int, target: float) -> dict[str, Any]:
    return {"method": spec["name"], "method_label": method_label(spec), "seed": seed, "target": target,
            "model": recipe.model.name, "dataset": recipe.data.name, "scope": recipe.prune.scope,
            "iterations": recipe.prune.iterations, **{f"method.{k}": v for k, v in spec.items() if k != "name"}}


def _label(spec: dict[str, Any]) -> str:
    return CONTROL_LABEL if spec == CONTROL else method_label(spec)


def _control_params(recipe: Recipe, seed: int) -> dict[str, Any]:
    return {"method": CONTROL["name"], "method_label": CONTROL_LABEL, "seed": seed, "model": recipe.model.name,
            "dataset": recipe.data.name}


def _run_isolated(ctx: Context, start: _DenseStart, spec: dict[str, Any], seed: int, target: float, key: str,
                  earlier: Any | None) -> CellResult:
    """One cell (or, for :data:`CONTROL`, a seed's dense control) in its own MLflow run (reopened when
    ``earlier`` is an unfinished attempt); an exception marks it FAILED and is returned, not raised, so the
    grid goes on. Interrupts propagate."""
    recipe = ctx.recipe
    control = spec == CONTROL
    label = _label(spec)
    cell = CellResult(label, seed, target, earlier.info.run_id if earlier is not None else "", control=control)
    checkpoints: CellCheckpoints | None = None
    params = _control_params(recipe, seed) if control else _cell_params(recipe, spec, seed, target)
    name = f"dense_control-s{seed}" if control else f"{label}-s{seed}-t{target}"
    try:
        with runs.cell_run(name, params, recipe.name, cell_key=key, run_id=cell.run_id or None,
                               kind="control" if control else "cell") as run:
            cell.run_id = run.info.run_id
            checkpoints = CellCheckpoints(cache.cell_checkpoint_path(recipe, cell.run_id), key, cell.run_id)
            cell.metrics = (run_control(ctx, start.model, start.metrics, seed, checkpoints=checkpoints) if control
                            else run_cell(ctx, start.model, start.metrics, spec, seed, target, checkpoints=checkpoints))
    except Exception as exc:  # isolate the failure (cell_run marked the run FAILED with the traceback)
        cell.status, cell.error = "FAILED", f"{type(exc).__name__}: {exc}"
        ctx.say(f"  {cell.describe()}: FAILED ({cell.error})")
    else:
        checkpoints.clear()  # type: ignore[union-attr]
    return cell


def run_recipe(recipe: Recipe, *, quiet: bool = False, resume: bool = False) -> RunSummary:
    """Run every cell of ``recipe``; a failing cell is marked FAILED and the others still run.

    ``resume``: reopen the latest parent run of the same resolved recipe in this experiment, skip its
    FINISHED cells and continue the others from their checkpoints, in their own MLflow runs.
    """
    ctx = Context(recipe, quiet, resume=resume)  # a missing dataset fails here ...
    preflight(ctx)  # ... a bad model, dense checkpoint or workdir here ...
    check_regularizers(ctx)  # ... a regularizer that cannot act here (a warning, or an error on request) ...
    uri = store.connect(recipe.tracking.uri, recipe.experiment)  # ... an unreachable store here: no run yet
    for name, why in broken_methods().items():
        if any(spec["name"] == name for spec in recipe.methods):
            ctx.say(f"method {name!r} is unavailable ({why}); its cells will be marked FAILED")
    rkey = cache.recipe_key(recipe)
    previous = runs.find_parent(recipe.experiment, rkey) if resume else None
    earlier = runs.cell_runs(previous) if previous is not None else {}
    if resume and previous is not None:
        finished = sum(r.info.status == "FINISHED" for r in earlier.values())
        ctx.say(f"resuming parent run {previous.info.run_id} ({finished} finished cells)")
    elif resume:
        ctx.say(f"nothing to resume for this recipe in experiment {recipe.experiment!r}; starting a new run")
    results: list[CellResult] = []
    run_name = f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with runs.parent_run(recipe.name, run_name, dump_recipe(recipe), recipe_key=rkey,
                             run_id=previous.info.run_id if previous is not None else None) as parent:
        if previous is None:
            runs.log_text(json.dumps({"device": str(ctx.device), **ctx.data.split_sizes()}), "data.json")
        for seed in recipe.seed_list:
            start: _DenseStart | None = None  # trained or loaded only if a cell of this seed still has to run
            control = [(CONTROL, 0.0)] if recipe.dense_control else []
            for spec, target in [*control, *((m, t) for m in recipe.methods for t in recipe.prune.targets)]:
                key = cache.cell_key(rkey, spec, seed, target)
                old = earlier.get(key)
                if old is not None and old.info.status == "FINISHED":
                    label = _label(spec)
                    results.append(CellResult(label, seed, target, old.info.run_id, metrics=dict(old.data.metrics),
                                              skipped=True, control=spec == CONTROL))
                    ctx.say(f"  {label} s{seed} t{target}: finished earlier (run {old.info.run_id})")
                    continue
                start = start or _dense_start(ctx, seed)
                results.append(_run_isolated(ctx, start, spec, seed, target, key, old))
        summary = RunSummary(parent.info.run_id, recipe.experiment, uri, results)
    return summary


def format_summary(summary: RunSummary) -> str:
    """The closing table of ``prunebench run`` (one line per cell)."""
    head = f"{'method':<24} {'seed':>4} {'target':>6} {'top1':>7} {'dense':>7} {'MACs(M)':>9} {'red.':>6} {'params(M)':>9} {'speedup':>7} {'zeroed':>6}"
    lines = [head, "-" * len(head)]
    for c in summary.cells:
        m = c.metrics
        if c.status == "FINISHED" and c.control:
            lines.append(f"{c.method:<24} {c.seed:>4} {'-':>6} {100 * m['test_top1']:>6.2f}% "
                         f"{100 * m['dense_test_top1']:>6.2f}% {m['macs'] / 1e6:>9.2f} {0:>6.3f} {m['params'] / 1e6:>9.3f}"
                         + ("  (finished earlier)" if c.skipped else ""))
            continue
        if c.status != "FINISHED":
            lines.append(f"{c.method:<24} {c.seed:>4} {c.target:>6.2f}  {c.status}: {c.error}")
            continue
        lines.append(
            f"{c.method:<24} {c.seed:>4} {c.target:>6.2f} {100 * m['test_top1']:>6.2f}% {100 * m['dense_test_top1']:>6.2f}% "
            f"{m['macs'] / 1e6:>9.2f} {m['macs_reduction']:>6.3f} {m['params'] / 1e6:>9.3f} {m['speedup']:>6.2f}x"
            + (f" {m['sparsity_zero_frac']:>6.0%}" if "sparsity_zero_frac" in m else "")
            + ("  (finished earlier)" if c.skipped else "")
        )
    lines.append(f"\nMLflow: {summary.tracking_uri}  experiment {summary.experiment!r}  parent run {summary.parent_run_id}")
    lines.append("Compare: prunebench compare --experiment " + repr(summary.experiment))
    return "\n".join(lines)
