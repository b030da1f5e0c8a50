"""The dense start of a seed: the user's ``dense.checkpoint``, the workdir's cache, or trained now (once per
seed, checkpointed every epoch, cached for every method of the seed and for later invocations; a file lock
makes concurrent runs train it once). A corrupt cache file is moved aside and the model trained again
(:func:`prunebench.files.load_cached`). See docs/fairness.md (one dense start) and docs/architecture.md."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import Timeout
from torch import nn

from prunebench import cache, distributed
from prunebench.cache import TrainingCheckpoint
from prunebench.commands.run.context import Context, load_user_checkpoint
from prunebench.errors import DivergedError, UserError, one_line
from prunebench.files import atomic_save, file_lock, load_cached
from prunebench.measure import count_macs
from prunebench.train import EpochStats, evaluate, make_optimizer, prepare_model, seed_everything, train

log = logging.getLogger(__name__)


def dense_model(ctx: Context, seed: int) -> nn.Module:
    """The dense start of ``seed``: a user checkpoint, the cache, or trained now (then cached).

    Training checkpoints every epoch (``<cache>.partial.pt``); with ``ctx.resume`` it continues from there.
    Under ``torchrun`` rank 0 alone takes the lock, reads and writes the files: the other ranks get its
    decision and, for a cached model, its weights; trained, every rank trains its shard.
    """
    recipe = ctx.recipe
    seed_everything(seed)  # the initial weights are part of what the seed determines
    model = ctx.new_model()
    if recipe.dense.checkpoint:
        load_user_checkpoint(recipe, model)
        log.info("seed %s: dense model from %s", seed, recipe.dense.checkpoint)
        return model
    if recipe.dense.epochs == 0:  # model.pretrained (the recipe checks): the pretrained weights are the dense model
        log.info("seed %s: dense model = the pretrained weights of %s", seed, recipe.model.name)
        return model
    path = cache.dense_path(recipe, seed)
    if distributed.world_size() > 1:
        return _dense_model_ranks(ctx, model, seed, path)
    lock = file_lock(path)
    if not path.is_file() and not _try_acquire(lock):
        log.info("seed %s: another process is training this dense model; waiting to reuse it", seed)
    with lock:  # a concurrent run waits here, then reuses the file
        if (payload := load_cached(path)) is not None:  # a corrupt file is moved aside and trained again
            model.load_state_dict(payload["state_dict"])
            log.info("seed %s: dense model from cache %s", seed, path)
            return model
        _train_dense(ctx, model, seed, path)
    return model


def _dense_model_ranks(ctx: Context, model: nn.Module, seed: int, path: Path) -> nn.Module:
    """:func:`dense_model` under ``torchrun``: rank 0 holds the lock while the ranks train together."""
    lock = file_lock(path) if distributed.is_main() else contextlib.nullcontext()
    with lock:
        payload = load_cached(path) if distributed.is_main() else None
        state = distributed.broadcast_object(payload["state_dict"] if payload is not None else None)
        if state is not None:
            model.load_state_dict(state)
            log.info("seed %s: dense model from cache %s", seed, path)
            return model
        _train_dense(ctx, model, seed, path)
    return model


def _try_acquire(lock: Any) -> bool:
    """Take ``lock`` if it is free (then release it again); ``False`` when another process holds it."""
    try:
        with lock.acquire(timeout=0):
            return True
    except Timeout:
        return False


def _train_dense(ctx: Context, model: nn.Module, seed: int, path: Path) -> None:
    """Train the dense model of ``seed`` (continuing from its partial checkpoint on resume), then cache it."""
    recipe = ctx.recipe
    key, partial = cache.dense_key(recipe, seed), cache.dense_partial_path(recipe, seed)
    start = TrainingCheckpoint.read(partial) if ctx.resume and distributed.is_main() else None
    if start is not None and (start.kind != "dense" or start.key != key):
        start = None
    start = distributed.broadcast_object(start)  # rank 0's decision, and below its weights
    optimizer = None
    if start is not None:
        prepare_model(distributed.load_checkpointed(partial, model), ctx.device, recipe.train)
        optimizer = make_optimizer(model, recipe.dense)
        optimizer.load_state_dict(start.optimizer)
        cache.set_rng_state(start.rng)  # type: ignore[arg-type]
        log.info("seed %s: resuming the dense model from its %s", seed, start.describe())
    else:
        log.info("seed %s: training the dense model (%s epochs, cached as %s)", seed, recipe.dense.epochs, path)

    def epoch_end(stats: EpochStats, opt: torch.optim.Optimizer) -> None:
        if not distributed.is_main():
            return
        TrainingCheckpoint("dense", key, 0, "dense", stats.epoch, stats.epoch + 1, optimizer=opt.state_dict()).save(
            model, partial
        )

    try:
        train(
            model,
            ctx.batches_for(seed, "dense"),
            recipe.dense,
            opts=recipe.train,
            desc=f"dense s{seed}",
            quiet=ctx.quiet,
            start_epoch=start.epoch + 1 if start else 0,
            optimizer=optimizer,
            on_epoch_end=epoch_end,
        )
    except DivergedError as exc:  # every cell of the seed would start from it: a recipe problem, not a cell's
        raise UserError(
            f"dense training of seed {seed} diverged ({one_line(exc)}); lower dense.lr or add dense.warmup_epochs"
        ) from exc
    if distributed.is_main():
        atomic_save({"state_dict": model.state_dict(), "key": key}, path)
        partial.unlink(missing_ok=True)


@dataclass
class DenseStart:
    """The dense model of a seed and the figures every cell of that seed reports against."""

    model: nn.Module
    metrics: dict[str, Any]


def dense_start(ctx: Context, seed: int) -> DenseStart:
    """:func:`dense_model` of ``seed``, evaluated on the test split and counted (MACs, parameters, layers)."""
    dense = dense_model(ctx, seed)
    report = count_macs(dense, ctx.example)
    metrics = {
        "dense_test_top1": evaluate(dense, ctx.data.eval_batches("test"), ctx.recipe.train),
        "macs_dense": report.macs,
        "macs_conv_fc_dense": report.macs_conv_fc,
        "params_dense": report.params,
        "_layers": report.per_layer,
    }
    log.info(
        "seed %s: dense test top-1 %.4f, %.1f M MACs, %.3f M params",
        seed,
        metrics["dense_test_top1"],
        report.macs / 1e6,
        report.params / 1e6,
    )
    return DenseStart(dense, metrics)
