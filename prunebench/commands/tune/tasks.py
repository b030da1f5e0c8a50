"""What ``prunebench tune`` searches: one :class:`TuneTask` (one Optuna study) per methods entry of the recipe
with a searched parameter, its search spaces, and the short schedule the trials run.

A ``lambda`` without an explicit space gets a provisional range at planning time; :func:`derive_spaces`
replaces it, once the dense model exists, by the range where the trials' sparsity stage can act
(docs/methods.md, "sparsity diagnostics"; docs/fairness.md for why every method is tuned the same way).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunebench.errors import UserError
from prunebench.groups import build_groups
from prunebench.recipe import PruneConfig, Recipe, SparsityConfig, TuneConfig, method_label
from prunebench.registry import build_method, get_method
from prunebench.spaces import SearchSpace, is_search_space, parse_search_space
from prunebench.sparsity import lambda_for_pull

log = logging.getLogger(__name__)


@dataclass
class TuneTask:
    """One study: a ``methods`` entry of the recipe, its fixed parameters and its searched ones."""

    index: int
    name: str
    fixed: dict[str, Any]
    spaces: dict[str, SearchSpace]
    study: str
    derived: tuple[str, ...] = ()  # parameters whose space comes from the schedule (:func:`derive_spaces`)

    @property
    def label(self) -> str:
        return method_label({"name": self.name, **self.fixed})

    def spec(self, values: dict[str, Any]) -> dict[str, Any]:
        """The method entry of a trial: fixed parameters plus the sampled ``values``."""
        return {"name": self.name, **self.fixed, **values}


def format_params(params: dict[str, Any] | None) -> str:
    """``lambda=0.000123, mode=x`` (``-`` for none): parameter values in messages, tables and headers."""
    if not params:
        return "-"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def default_spaces(name: str) -> dict[str, SearchSpace]:
    """A provisional log-uniform ``lambda`` range around the method's default, when it has one (else nothing);
    :func:`derive_spaces` replaces it by the range the trials' schedule calls for."""
    spaces = {}
    for key, f in get_method(name).Params.model_fields.items():
        pname = f.alias or key
        if pname == "lambda" and isinstance(f.default, (int, float)) and f.default > 0:
            d = float(f.default)
            spaces[pname] = SearchSpace(low=d / 10, high=d * 10, log=True)
    return spaces


def plan_tasks(
    recipe: Recipe, cfg: TuneConfig, methods: list[str] | None, study: str | None, *, announce: bool = True
) -> list[TuneTask]:
    """The studies of an invocation: every methods entry with a searched parameter (optionally filtered).

    A parameter is searched when the entry writes it as a space, when ``tune.spaces.<method>`` names it
    (that space wins over a value in the entry), or -- for ``lambda`` -- by default. Entries without any
    are skipped with a message (``announce=False``: silently, for a second planning of the same recipe).
    """
    src = str(getattr(recipe, "_source", "recipe"))
    for name in cfg.spaces:
        try:
            get_method(name)
        except UserError as exc:
            raise UserError(f"{src}: tune.spaces.{name}: {exc}") from None
        if announce and name not in {m["name"] for m in recipe.methods}:
            log.warning("note: tune.spaces.%s is ignored: %r is not in the recipe's methods", name, name)
    names = [m["name"] for m in recipe.methods]
    if methods:
        unknown = [m for m in methods if m not in names]
        if unknown:
            raise UserError(
                f"--methods: {', '.join(unknown)} not in the recipe's methods ({', '.join(names)}); pick from those"
            )
    tasks: list[TuneTask] = []
    for i, entry in enumerate(recipe.methods):
        name = entry["name"]
        if methods and name not in methods:
            continue
        fixed = {k: v for k, v in entry.items() if k != "name" and not is_search_space(v)}
        spaces = {
            **default_spaces(name),
            **{k: parse_search_space(v) for k, v in entry.items() if is_search_space(v)},
            **cfg.spaces.get(name, {}),
        }
        for key in spaces:
            fixed.pop(key, None)
        if not spaces:
            if announce:
                log.info("%s: nothing to tune (no search space and no lambda); skipped", method_label(entry))
            continue
        explicit = {k for k, v in entry.items() if is_search_space(v)} | set(cfg.spaces.get(name, {}))
        derived = tuple(k for k in default_spaces(name) if k not in explicit)
        base = {"name": name, **fixed, **{k: s.ends[0] for k, s in spaces.items()}}
        for key, space in spaces.items():  # every end of every range must be a valid parameter value
            for value in space.ends:
                build_method({**base, key: value}, where=f"{src}: tune.spaces.{name}")
        tasks.append(TuneTask(i, name, fixed, spaces, "", derived))
    if not tasks:
        raise UserError(
            f"{src}: nothing to tune: no method in {', '.join(methods or names)} has a search space or a "
            "lambda; add tune.spaces.<method>.<param>: {low: ..., high: ..., log: true}"
        )
    if any(t.derived for t in tasks) and trial_recipe(recipe, cfg).sparsity.epochs == 0:
        raise UserError(
            f"{src}: the trials' sparsity stage has no epochs (sparsity.epochs or tune.sparsity_epochs "
            "is 0), so no lambda can act; give the stage epochs or write the lambda spaces yourself"
        )
    _name_studies(tasks, study or cfg.study, recipe.name, unique=len({t.name for t in tasks}) == len(tasks))
    return tasks


def _name_studies(tasks: list[TuneTask], base: str | None, recipe_name: str, unique: bool) -> None:
    """``<recipe>-<method>`` (the fixed parameters too when a method is listed twice); ``--study`` replaces
    the whole name for a single study and the prefix for several."""
    seen: set[str] = set()
    for t in tasks:
        suffix = t.name if unique else t.label
        name = base if base and len(tasks) == 1 else f"{base or recipe_name}-{suffix}"
        while name in seen:
            name += f"-{t.index}"
        seen.add(name)
        t.study = name


def trial_recipe(recipe: Recipe, cfg: TuneConfig) -> Recipe:
    """The recipe a trial runs: the short schedule of ``tune:`` at one MACs target.

    The data, model and dense sections are untouched, so trials reuse the dense checkpoint that
    ``prunebench run`` caches for the same seed.
    """
    update: dict[str, Any] = {"prune": recipe.prune.model_copy(update={"target": trial_target(recipe, cfg)})}
    if cfg.sparsity_epochs is not None:
        update["sparsity"] = recipe.sparsity.model_copy(update={"epochs": cfg.sparsity_epochs})
    if cfg.finetune_epochs is not None:
        update["finetune"] = recipe.finetune.model_copy(update={"epochs": cfg.finetune_epochs})
    return recipe.model_copy(update=update)


def trial_target(recipe: Recipe, cfg: TuneConfig) -> float:
    return cfg.target if cfg.target is not None else recipe.prune.targets[0]


def trial_seed(recipe: Recipe, cfg: TuneConfig) -> int:
    return cfg.seed if cfg.seed is not None else recipe.seed_list[0]


def suggest(trial: Any, name: str, space: SearchSpace) -> Any:
    """Sample one parameter from its space."""
    if space.choices is not None:
        return trial.suggest_categorical(name, space.choices)
    if space.is_int:
        return trial.suggest_int(name, int(space.low), int(space.high), step=int(space.step or 1), log=space.log)
    return trial.suggest_float(name, float(space.low), float(space.high), step=space.step, log=space.log)


def describe_space(space: SearchSpace) -> str:
    if space.choices is not None:
        return f"choice{space.choices}"
    kind = "loguniform" if space.log else ("int" if space.is_int else "uniform")
    return f"{kind}[{space.low:g}, {space.high:g}]" + (f" step {space.step:g}" if space.step else "")


def derive_spaces(
    tasks: list[TuneTask],
    dense: nn.Module,
    example: Any,
    sparsity: SparsityConfig,
    prune: PruneConfig,
    steps_per_epoch: int,
    pull_range: tuple[float, float],
) -> None:
    """Replace each derived ``lambda`` space by the range where the trials' ``sparsity`` stage reaches
    ``pull_range`` (``tune.pull_range``, default: ``sparsity_pull`` 0.5 to 16) on the ``dense`` model the trials
    start from: from where the regularizer starts to act up to well past zeroing the median group. A range
    reaching down to inert values would let the tuner pick a lambda that ranks like lambda = 0."""
    todo = [t for t in tasks if "lambda" in t.derived]
    if not todo:
        return
    _, groups = build_groups(dense, example, scope=prune.scope, ignored_layers=prune.ignored_layers)
    for t in todo:
        if set(t.spaces) - {"lambda"}:  # e.g. a searched mode changes the pull per lambda: no one range fits
            log.info(
                "%s: lambda keeps the range %s (other parameters are searched too); give it a space to choose another",
                t.label,
                describe_space(t.spaces["lambda"]),
            )
            continue
        unit = build_method({**t.spec({}), "lambda": 1.0})
        unit.attach(dense, groups)
        if not unit.regularized_norms():  # a plugin without the diagnostics: nothing to derive from
            continue
        ends = [lambda_for_pull(unit, sparsity, steps_per_epoch, p) for p in pull_range]
        if ends[0] is None or ends[1] is None:
            raise UserError(
                f"{t.label}: the trials' sparsity stage has no steps (tune.sparsity_epochs or "
                "sparsity.epochs is 0), so lambda cannot act; give the stage epochs"
            )
        space = SearchSpace(low=float(f"{ends[0]:.3g}"), high=float(f"{ends[1]:.3g}"), log=True)
        for value in space.ends:  # the method's own bounds on lambda still apply
            build_method(t.spec({"lambda": value}), where=f"tune: the lambda range derived for {t.label}")
        t.spaces["lambda"] = space
