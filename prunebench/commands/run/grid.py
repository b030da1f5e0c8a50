"""The grid of one ``prunebench run``: every (method, seed, target) cell of a recipe, plus a dense control
per seed, under one MLflow parent run. Checks run first, so a bad recipe is refused before any run or file
exists; ``--resume`` reopens the latest parent run of the same recipe and skips its finished cells. At the
end the parent run's description (MLflow's note) holds the comparison table of its cells.
See docs/architecture.md (the run command, resume) and docs/tracking.md (the runs)."""

from __future__ import annotations

import json
import logging
import time

from prunebench import cache
from prunebench.commands.run.cell import run_isolated
from prunebench.commands.run.context import Context, check_regularizers, preflight
from prunebench.commands.run.dense import DenseStart, dense_start
from prunebench.commands.run.phases import CONTROL, label
from prunebench.commands.run.summary import CellResult, RunSummary, set_parent_note
from prunebench.recipe import Recipe, dump_recipe
from prunebench.registry import broken_methods
from prunebench.tracking import runs, schema, store

log = logging.getLogger(__name__)


def run_recipe(recipe: Recipe, *, quiet: bool = False, resume: bool = False) -> RunSummary:
    """Run every cell of ``recipe``; a failing cell is marked FAILED and the others still run.

    ``quiet``: no progress bars. ``resume``: reopen the latest parent run of the same resolved recipe in
    this experiment, skip its FINISHED cells and continue the others from their checkpoints, in their own
    MLflow runs.
    """
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
    results: list[CellResult] = []
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
        for seed in recipe.seed_list:
            start: DenseStart | None = None  # trained or loaded only if a cell of this seed still has to run
            control = [(CONTROL, 0.0)] if recipe.dense_control else []
            for spec, target in [*control, *((m, t) for m in recipe.methods for t in recipe.prune.targets)]:
                key = cache.cell_key(rkey, spec, seed, target)
                old = earlier.get(key)
                if old is not None and old.info.status == "FINISHED":
                    results.append(
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
                start = start or dense_start(ctx, seed)
                results.append(run_isolated(ctx, start, spec, seed, target, key, old))
        summary = RunSummary(parent.info.run_id, recipe.experiment, uri, results)
        set_parent_note(summary)  # the comparison of every cell of this parent, resumed ones included
    return summary
