"""What every cell of one ``prunebench run`` shares (:class:`Context`: recipe, device, data, the dense ONNX models)
and the checks made before any MLflow run or file exists: :func:`preflight` (which also settles the pruning
scope: :func:`check_reach`) and the regularizer pull check.
See docs/architecture.md (the run command) and docs/methods.md (sparsity_pull, reachability)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebench import cache, distributed
from prunebench.budget import describe_device, resolve_round_to
from prunebench.data import DataModule, load_data
from prunebench.errors import UserError, one_line
from prunebench.files import load_cached, load_torch
from prunebench.groups import build_groups
from prunebench.models import create_model
from prunebench.reach import Reach, measure_reach, resolve_scope
from prunebench.recipe import Recipe, method_label
from prunebench.registry import broken_methods, build_method, get_method
from prunebench.sparsity import check_pulls, sparsity_pull, steps_per_epoch
from prunebench.tracking import store
from prunebench.train import evaluate, prepare_model, resolve_device, seed_everything

_STAGE_CODE = {"dense": 1, "sparsity": 2, "between": 3, "finetune": 4}
log = logging.getLogger(__name__)


class Context:
    """What every cell of an invocation shares: the recipe, device, data and a few measurements.

    ``quiet``: no progress bars (messages go through :mod:`logging`; the CLI's ``-q`` raises its level); always
    on for the ranks other than 0 of a ``torchrun`` launch, which join the process group here.
    ``resume``: continue an interrupted dense training from its checkpoint (cells resume by run id).
    ``reach``: the largest MACs reduction of each scope, once :func:`preflight` measured it; from then on
    ``recipe.prune.scope`` is the resolved scope (never ``auto``), the one every cell uses.
    """

    def __init__(self, recipe: Recipe, quiet: bool, *, resume: bool = False) -> None:
        self.recipe = recipe
        self.resume = resume
        device = resolve_device(recipe.train.device)
        distributed.check_launch(recipe.train.sync_batchnorm, device)  # before joining: every rank refuses alike
        self.device = distributed.init(device)  # under torchrun: this rank's device, the process group joined
        self.quiet = quiet or not distributed.is_main()
        self.data: DataModule = load_data(recipe.data, self.device)
        self.example = torch.zeros(
            1, self.data.in_chans, self.data.image_size, self.data.image_size, device=self.device
        )
        distributed.check_batch(steps_per_epoch(self.data.split_sizes()["train"], recipe.data.batch_size))
        self.reach: Reach | None = None
        self.dense_onnx: dict[int, Any] = {}  # seed -> the dense model in ONNX Runtime, or why it did not export

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch of this recipe's data (per rank under ``torchrun``:
        :func:`prunebench.distributed.shard`)."""
        batches = steps_per_epoch(self.data.split_sizes()["train"], self.recipe.data.batch_size)
        return -(-batches // distributed.world_size())

    @property
    def global_batch(self) -> int:
        """Images per optimizer step: ``data.batch_size`` on each of the ``world_size`` processes."""
        return self.recipe.data.batch_size * distributed.world_size()

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

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One input sample's shape (``C, H, W``)."""
        return tuple(self.example.shape[1:])


def preflight(ctx: Context) -> None:
    """Check what a user can get wrong that the recipe schema cannot see, before any run or file exists:
    the model builds, ``dense.checkpoint`` exists and fits it, the workdir and the tracking store's
    folder are writable, and the pruning targets are within reach (:func:`check_reach`, which also resolves
    ``scope: auto``). (The data was loaded by :class:`Context`.) Every problem is a :class:`UserError`."""
    model = ctx.new_model()
    if ctx.recipe.dense.checkpoint:
        load_user_checkpoint(ctx.recipe, model)
    cache.check_writable(cache.workdir(ctx.recipe))
    store.check_uri(ctx.recipe.tracking.uri)
    check_reach(ctx, model)


def check_reach(ctx: Context, model: nn.Module) -> None:
    """Refuse a target the prunable groups cannot reach, before any training, and settle the scope.

    On ``model`` (freshly built: only its shapes matter) measure the largest MACs reduction of each scope
    under the recipe's ``max_layer_ratio`` and ``round_to`` (:func:`prunebench.reach.measure_reach`); an
    unreachable target is a :class:`UserError` with the reachable figures. ``scope: auto`` resolves to
    ``internal`` when it reaches the largest target, else ``all``, and says so once; ``round_to: auto`` resolves
    to the device's vector width (:func:`prunebench.budget.device_round_to`). ``ctx.recipe`` then carries the
    resolved scope and ``round_to``, so the cells, this check and the logged parameters agree.
    """
    prune = ctx.recipe.prune
    round_to = resolve_round_to(prune.round_to, ctx.device)
    if prune.round_to == "auto":
        log.info("prune.round_to auto -> %s (the vector width of %s)", round_to or 1, describe_device(ctx.device))
    reach = measure_reach(
        model,
        ctx.example,
        max_layer_ratio=prune.max_layer_ratio,
        round_to=round_to,
        ignored_layers=prune.ignored_layers,
    )
    scope, why = resolve_scope(reach, prune.scope, prune.targets, model=ctx.recipe.model.name)
    if prune.scope == "auto":
        log.info("prune.scope auto -> %s: %s", scope, why)
    ctx.reach = reach
    resolved = prune.model_copy(update={"scope": scope, "round_to": round_to or 1})
    ctx.recipe = ctx.recipe.model_copy(update={"prune": resolved})


def load_user_checkpoint(recipe: Recipe, model: nn.Module) -> None:
    """Load ``dense.checkpoint`` (a state dict, or ``{"state_dict": ...}``) into ``model`` with weights_only.

    The user's file, unlike a cached one, is never moved aside: any problem is a :class:`UserError` naming it.
    """
    path = Path(recipe.dense.checkpoint or "").expanduser()
    if not path.is_file():
        raise UserError(f"dense.checkpoint {str(path)!r} does not exist; fix the path or remove the key to train")
    try:
        state = load_torch(path)
    except Exception as exc:  # truncated, not a torch file, or one that needs code to unpickle
        raise UserError(
            f"dense.checkpoint {str(path)!r} cannot be read as a weights-only state dict "
            f"({one_line(exc, 160)}); save it with torch.save(model.state_dict(), path)"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(
            f"dense.checkpoint {str(path)!r} does not match model {recipe.model.name!r}: "
            f"{one_line(exc)}; point it at a state dict of this model"
        ) from None


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
    if recipe.dense.checkpoint:
        load_user_checkpoint(recipe, model)
    elif (payload := load_cached(cache.dense_path(recipe, recipe.seed_list[0]))) is not None:
        model.load_state_dict(payload["state_dict"])
    _, groups = build_groups(model, ctx.example, scope=recipe.prune.scope, ignored_layers=recipe.prune.ignored_layers)
    out = []
    for spec in specs:
        method = build_method(spec)
        try:
            method.attach(model, groups)
            pull = sparsity_pull(method, recipe.sparsity, ctx.steps_per_epoch)
        except Exception as exc:  # a plugin's bug: its cells fail and say why, the others run
            log.warning(
                "warning: could not estimate sparsity_pull of %s (%s: %s)",
                method_label(spec),
                type(exc).__name__,
                one_line(exc),
            )
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
