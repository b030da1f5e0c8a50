"""The *tuned recipe*: the input recipe (after ``extends`` and overrides) with each tuned parameter set to its
study's best value, which ``prunebench run`` accepts unchanged. It is written atomically (several workers
on one study each write a whole file), with a header saying where every value comes from.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import yaml

from prunebench.commands.tune.report import StudyResult
from prunebench.commands.tune.tasks import format_params
from prunebench.files import atomic_write_text
from prunebench.recipe import Recipe
from prunebench.registry import resolve_plugin_path
from prunebench.spaces import is_search_space


def tuned_recipe_data(
    data: dict[str, Any], recipe: Recipe, best: dict[int, dict[str, Any]], recipe_dir: Path
) -> dict[str, Any]:
    """``data`` (the recipe after extends and overrides) with methods entry ``i`` set to ``best[i]``.

    Search spaces are replaced by values, other keys and the ``tune:`` section are kept, and plugin
    files found beside the original recipe are written as absolute paths, so the file runs from anywhere
    ``prunebench run`` on the original would.
    """
    out = copy.deepcopy(data)
    for i, values in best.items():
        entry = dict(recipe.methods[i])
        out["methods"][i] = {
            **{k: values.get(k, v) for k, v in entry.items()},
            **{k: v for k, v in values.items() if k not in entry},
        }
    plugins = []
    for p in out.get("plugins") or []:
        found = resolve_plugin_path(p, recipe_dir)
        plugins.append(p if found == Path(os.path.expandvars(p)).expanduser() else str(found.resolve()))
    if plugins:
        out["plugins"] = plugins
    return out


def still_searched(data: dict[str, Any]) -> list[str]:
    """``methods[i].<param>`` of every search space left in the tuned recipe (a study without a completed trial)."""
    return [f"methods[{i}].{k}" for i, m in enumerate(data["methods"]) for k, v in m.items() if is_search_space(v)]


def default_out(recipe_path: Path) -> Path:
    """``<recipe stem>.tuned.yaml`` in the working directory (``x.tuned.yaml`` tuned again stays ``x.tuned.yaml``)."""
    stem = recipe_path.name.removesuffix(".yaml").removesuffix(".yml").removesuffix(".tuned")
    return Path(f"{stem}.tuned.yaml")


def write_tuned(path: Path, data: dict[str, Any], source: Path, results: list[StudyResult], target: float) -> str:
    """Write the tuned recipe with a header saying where each value comes from; returns the text."""
    lines = [
        f"# Tuned by `prunebench tune {source}` on {time.strftime('%Y-%m-%d %H:%M')}:",
        f"# the best validation top-1 at {100 * target:g}% fewer MACs after the short schedule of tune:",
        "# (the test split was not read)",
    ]
    for r in results:
        if r.best_params is not None:
            lines.append(
                f"#   {r.task.label}: {format_params(r.best_params)} -> val_top1 {r.best_value:.4f} "
                f"(study {r.task.study!r}, trial {r.best_number} of {r.n_trials})"
            )
        else:
            lines.append(f"#   {r.task.label}: no completed trial in study {r.task.study!r}; left as written")
    lines.append(f"# Next: prunebench run {path}")
    text = "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)
    atomic_write_text(path, text)
    return text
