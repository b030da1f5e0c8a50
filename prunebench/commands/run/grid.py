"""The grid of one ``prunebench run``: every (method, seed, target) cell of a recipe, plus a dense control
per seed, under one MLflow parent run. Checks run first, so a bad recipe is refused before any run or file
exists; ``--resume`` reopens the latest parent run of the same recipe and skips its finished cells. The cells
still to run go to an executor: this process, one after another (``local``, :func:`run_local`), or Ray tasks
(:mod:`.ray_executor`). At the end the parent run's description (MLflow's note) holds the comparison table of
its cells. See docs/architecture.md (the run command, resume) and docs/tracking.md (the runs)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prunebench import cache
from prunebench.commands import raytasks
from prunebench.commands.run import ray_executor
from prunebench.commands.run.cell import run_isolated
from prunebench.commands.run.context import Context, check_regularizers, preflight
from prunebench.commands.run.dense import DenseStart, dense_start
from prunebench.commands.run.phases import CONTROL, label
from prunebench.commands.run.ray_executor import PendingCell
from prunebench.commands.run.summary import CellResult, RunSummary, set_parent_note
from prunebench.recipe import Recipe, dump_recipe
from prunebench.registry import broken_methods
from prunebench.tracking import runs, schema, store

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")


def run_recipe(
    recipe: Recipe,
    *,
    quiet: bool = False,
    resume: bool = False,
    executor: str = "local",
    address: str | None = None,
) -> RunSummary:
    """Run every cell of ``recipe``; a failing cell is marked FAILED and the others still run.

    ``quiet``: no progress bars. ``resume``: reopen the latest parent run of the same resolved recipe in
    this experiment, skip its FINISHED cells and continue the others from their checkpoints, in their own
    MLflow runs. ``executor``: ``local`` (this process, cell after cell) or ``ray`` (a Ray task per dense model,
    then per cell; ``address`` joins a running cluster, else a local instance is started).
    """
    if executor == "ray":  # Ray missing or an address that does not answer: refused before anything else
        raytasks.check(address)
    ctx = Context(recipe, quiet, resume=resume)  # a missing dataset fails here ...
    preflight(ctx)  # ... a bad model, dense checkpoint or workdir here ...
    check_regularizers(ctx)  # ... a regularizer that cannot act here (a warning, or an error on request) ...
    uri = store.connect(recipe.tracking.uri, recipe.experiment)  # ... an unreachable store here: no run yet
    for name, why in broken_methods().items():
        if any(spec["name"] == name for spec in recipe.methods):
            log.info("method %r is unavailable (%s); its cells will be marked FAILED", name, why)
    rkey = cache.recipe_key(recipe)
    previous = runs.find_parent(recipe.experiment, rkey) if resume else None
    earlier = runs.cell_runs(previous) if previous is not None else {}
    if resume and previous is not None:
        finished = sum(r.info.status == "FINISHED" for r in earlier.values())
        log.info("resuming parent run %s (%s finished cells)", previous.info.run_id, finished)
    elif resume:
        log.info("nothing to resume for this recipe in experiment %r; starting a new run", recipe.experiment)
    run_name = f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with runs.parent_run(
        recipe.name,
        run_name,
        dump_recipe(recipe),
        recipe_key=rkey,
        run_id=previous.info.run_id if previous is not None else None,
    ) as parent:
        if previous is None:
            runs.log_text(json.dumps({"device": str(ctx.device), **ctx.data.split_sizes()}), schema.DATA_ARTIFACT)
        plan = _plan(ctx.recipe, rkey, earlier)
        pending = [c for c in plan if isinstance(c, PendingCell)]
        if executor == "ray":
            done = ray_executor.run_cells(ctx, pending, parent=parent, uri=uri, address=address)
        else:
            done = run_local(ctx, pending)
        ran = iter(done)
        results = [c if isinstance(c, CellResult) else next(ran) for c in plan]
        summary = RunSummary(parent.info.run_id, recipe.experiment, uri, results)
        set_parent_note(summary)  # the comparison of every cell of this parent, resumed ones included
    return summary


def _plan(recipe: Recipe, rkey: str, earlier: dict[str, Any]) -> list[CellResult | PendingCell]:
    """Every cell of the grid in order, seed by seed (the dense control first): a :class:`CellResult` for one
    an earlier invocation finished (``--resume``), else a :class:`PendingCell`."""
    plan: list[CellResult | PendingCell] = []
    for seed in recipe.seed_list:
        control = [(CONTROL, 0.0)] if recipe.dense_control else []
        for spec, target in [*control, *((m, t) for m in recipe.methods for t in recipe.prune.targets)]:
            key = cache.cell_key(rkey, spec, seed, target)
            old = earlier.get(key)
            if old is not None and old.info.status == "FINISHED":
                plan.append(
                    CellResult(
                        label(spec),
                        seed,
                        target,
                        old.info.run_id,
                        metrics=dict(old.data.metrics),
                        skipped=True,
                        control=spec == CONTROL,
                    )
                )
                log.info("  %s s%s t%s: finished earlier (run %s)", label(spec), seed, target, old.info.run_id)
                continue
            plan.append(PendingCell(spec, seed, target, key, old))
    return plan


def run_local(ctx: Context, pending: list[PendingCell]) -> list[CellResult]:
    """The cells in this process, one after another; a seed's dense start is made when its first cell runs."""
    results: list[CellResult] = []
    start: DenseStart | None = None
    start_seed: int | None = None
    for cell in pending:
        if start is None or start_seed != cell.seed:
            start, start_seed = None, cell.seed  # free the previous seed's model before making the next one
            start = dense_start(ctx, cell.seed)
        results.append(run_isolated(ctx, start, cell.spec, cell.seed, cell.target, cell.key, cell.earlier))
    return results
