"""Recipes: YAML files mapped 1:1 onto a typed pydantic schema.

A recipe describes one comparison (see README "Recipe format"). Loading it:

1. ``yaml.safe_load`` (syntax errors report line and column);
2. ``extends: parent.yaml`` chains are merged, parent first (mappings merge key by key, everything else
   is replaced); a cycle or a missing parent is an error;
3. command-line overrides ``-o key.path=value`` are applied, each value parsed as YAML;
4. the result is validated: unknown keys, wrong types and out-of-range values are rejected with the
   file name and key path on one line, before any work starts;
5. plugin files are loaded and every ``methods`` entry is validated against its method's parameters.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunebench.errors import UserError, close_matches
from prunebench.spaces import SearchSpace


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(_Strict):
    """Where the images come from and how they are split and augmented."""

    name: Literal["cifar10", "cifar100", "imagefolder", "digits", "synthetic"]
    root: str | None = Field(None, description="dataset folder; relative to the working directory, $VARS expand")
    download: bool = Field(False, description="let torchvision download CIFAR when the folder is missing")
    val_split: float = Field(0.1, ge=0, lt=1, description="fraction of the training set held out for validation")
    augment: bool = Field(True, description="random crop with padding and horizontal flip on training batches")
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    split_seed: int = Field(0, description="seed of the train/validation split (fixed across seeds of a grid)")
    image_size: int | None = Field(None, ge=8, description="imagefolder/synthetic: side of the square input")
    num_classes: int | None = Field(None, ge=2, description="synthetic only")
    num_samples: int = Field(512, ge=8, description="synthetic only: training images")
    workers: int = Field(4, ge=0, description="imagefolder only: DataLoader workers")


class ModelConfig(_Strict):
    """A timm model name (CIFAR models are registered into timm) and its constructor arguments."""

    name: str
    pretrained: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict)


class Schedule(_Strict):
    """One training stage: SGD with momentum, weight decay and a step or cosine schedule."""

    epochs: int = Field(ge=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="step schedule: epochs where lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class SparsityConfig(Schedule):
    """The sparsity-training stage: the regularized methods' hooks run, the others train plainly."""

    require_pull: bool = Field(
        False,
        description="refuse (exit 2) a recipe whose regularized methods cannot act: sparsity_pull < 0.5 "
        "before any training (otherwise a warning)",
    )


class DenseConfig(Schedule):
    """The dense start: trained once per seed (and cached), or loaded from ``checkpoint``."""

    epochs: int = Field(160, ge=0)
    checkpoint: str | None = Field(None, description="state_dict file to start from instead of training")


class PruneConfig(_Strict):
    """How far and how the shared engine prunes (see README "Pruning engine")."""

    target: float | list[float] = Field(
        0.5, description="MACs reduction asked for, in (0, 1); a list gives one cell per target"
    )
    scope: Literal["auto", "internal", "all"] = "auto"
    max_layer_ratio: float = Field(
        0.8, gt=0, le=1, description="at most this fraction of a layer's channels is removed"
    )
    iterations: int = Field(1, ge=1, description="prune in k steps with fine-tuning between them")
    epochs_between: int = Field(1, ge=0, description="fine-tuning epochs between iterative pruning steps")
    ignored_layers: list[str] = Field(
        default_factory=list, description="module names never pruned (besides stem and classifier)"
    )
    round_to: int | Literal["auto"] | None = Field(
        "auto",
        description="keep channel counts multiples of this, the same for every method: auto = the device's "
        "vector width (16 on AVX-512 CPUs, 8 on AVX2 and CUDA, 4 otherwise), 1 = the widths as pruned (the papers' "
        "exact widths)",
    )
    calib_images: int = Field(256, ge=1, description="training images shown to calibration-based methods (ThiNet)")

    @field_validator("round_to")
    @classmethod
    def _round_to_positive(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"round_to {v} must be auto or a positive integer (1: the widths as pruned)")
        return v

    @field_validator("target")
    @classmethod
    def _target_in_range(cls, v: float | list[float]) -> float | list[float]:
        for t in v if isinstance(v, list) else [v]:
            if not 0 < t < 1:
                raise ValueError(f"target {t} must be a MACs reduction strictly between 0 and 1 (e.g. 0.5)")
        if isinstance(v, list) and not v:
            raise ValueError("target list is empty")
        return v

    @property
    def targets(self) -> list[float]:
        return list(self.target) if isinstance(self.target, list) else [self.target]


class TrackingConfig(_Strict):
    """MLflow tracking: ``uri`` defaults to ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``."""

    uri: str | None = None
    experiment: str | None = Field(None, description="MLflow experiment; defaults to the recipe's name")


class ExecutorConfig(_Strict):
    """How ``prunebench run --executor ray`` runs each task (where a run runs, not what it computes: left out
    of the recipe's dump, so it changes no cache or resume key)."""

    resources: dict[str, float] | None = Field(
        None,
        description="Ray resources of one task, e.g. {num_cpus: 4} or {num_gpus: 1}; default one GPU on a CUDA "
        "machine, else one CPU",
    )
    max_retries: int = Field(0, ge=0, description="times Ray retries a cell whose worker died")


class TrainOptions(_Strict):
    """Execution options shared by every stage (they change speed, not the science)."""

    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, ...")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(
        True, description="train and evaluate in channels_last (NHWC) memory format, on every device (faster)"
    )
    compile: bool = Field(False, description="torch.compile the model for training")
    log_every: int = Field(50, ge=1, description="steps between progress-bar/NaN checks (host syncs)")
    sync_batchnorm: bool = Field(
        False, description="under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)"
    )


class MeasureConfig(_Strict):
    """Latency measurement of the final models."""

    latency_batch: int = Field(64, ge=1, description="the larger batch (batch 1 is always measured too)")
    warmup: int = Field(3, ge=0, description="untimed rounds before the timed ones")
    repeats: int = Field(
        10, ge=1, description="timed rounds; each times the dense and the pruned model once, interleaved"
    )
    onnx: bool = Field(True, description="also export every model to ONNX and time it with ONNX Runtime")


class TuneConfig(_Strict):
    """The ``tune:`` section: search spaces per method and how ``prunebench tune`` runs its studies.

    Trials run a short schedule (``sparsity_epochs``, ``finetune_epochs``) at one MACs target from the
    cached dense model of one seed and are scored on the validation split, never on test.
    """

    spaces: dict[str, dict[str, SearchSpace]] = Field(
        default_factory=dict,
        description="method name -> parameter -> space; a method with `lambda` and no "
        "space gets the log-uniform range where the trials' sparsity stage reaches tune.pull_range",
    )
    pull_range: tuple[float, float] = Field(
        (0.5, 16.0),
        description="a lambda without a space is searched (log scale) between the values at which the "
        "trials' sparsity stage reaches these sparsity_pull figures on the dense model",
    )
    trials: int = Field(20, ge=1, description="trials each study should have in total (a rerun tops up)")
    timeout: float | None = Field(None, gt=0, description="seconds per method after which no new trial starts")
    objective: Literal["val_top1"] = Field("val_top1", description="validation top-1 of the pruned, fine-tuned model")
    target: float | None = Field(
        None, gt=0, lt=1, description="MACs reduction of the trials (default: the first target)"
    )
    seed: int | None = Field(None, description="dense seed the trials start from (default: the first seed)")
    sparsity_epochs: int | None = Field(
        None, ge=0, description="sparsity-training epochs of a trial (default: the recipe's)"
    )
    finetune_epochs: int | None = Field(None, ge=0, description="fine-tuning epochs of a trial (default: the recipe's)")
    sampler: Literal["tpe", "random"] = "tpe"
    sampler_seed: int = Field(0, description="seed of the sampler (mixed with the trial number)")
    startup_trials: int | None = Field(
        None, ge=0, description="TPE: random trials first (default: min(10, trials // 3))"
    )
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_warmup_epochs: int | None = Field(
        None,
        ge=0,
        description="epochs before the pruner may stop a trial (default: the sparsity epochs, so "
        "trials are judged on the pruned model)",
    )
    storage: str | None = Field(None, description="Optuna RDB URL (default: optuna.db beside the MLflow SQLite store)")
    study: str | None = Field(None, description="study name (default: <recipe name>-<method>)")

    @field_validator("pull_range")
    @classmethod
    def _pull_range_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] < v[1] < float("inf")):
            raise ValueError(f"pull_range {list(v)} must be two increasing finite positive numbers, e.g. [0.5, 16]")
        return v

    heartbeat_interval: int | None = Field(
        60,
        ge=1,
        description="seconds between a running trial's heartbeats; a trial silent for two intervals "
        "(its process died) is marked failed",
    )


class Recipe(_Strict):
    """A whole comparison: methods x seeds x targets on one model and dataset."""

    name: str = Field(min_length=1)
    plugins: list[str] = Field(default_factory=list, description="plugin files that register methods")
    data: DataConfig
    model: ModelConfig
    dense: DenseConfig = Field(default_factory=DenseConfig)
    sparsity: SparsityConfig = Field(default_factory=lambda: SparsityConfig(epochs=0))
    methods: list[dict[str, Any]] = Field(min_length=1)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    finetune: Schedule = Field(default_factory=lambda: Schedule(epochs=0, lr=0.01))
    seeds: int | list[int] = Field(1, description="a count (0..n-1) or an explicit list")
    dense_control: bool = Field(
        True,
        description="per seed, also train the dense model unpruned for the same extra stages (sparsity "
        "length, fine-tuning): the 'dense (same epochs)' row of compare",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, exclude=True)
    train: TrainOptions = Field(default_factory=TrainOptions)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    workdir: str = Field(".prunebench", description="dense cache and checkpoints")
    tune: TuneConfig | None = Field(None, description="search spaces and study settings for `prunebench tune`")

    @model_validator(mode="after")
    def _dense_start_given(self) -> Recipe:
        if self.dense.epochs < 1 and not self.dense.checkpoint and not self.model.pretrained:
            raise ValueError(
                "dense.epochs must be at least 1 unless dense.checkpoint is given or model.pretrained is true"
            )
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds_ok(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1:
            raise ValueError("seeds must be a positive count or a non-empty list")
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("seeds list must be non-empty and without duplicates")
        return v

    @field_validator("methods")
    @classmethod
    def _methods_named(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, m in enumerate(v):
            if not isinstance(m, dict) or not isinstance(m.get("name"), str):
                raise ValueError(f"entry {i} needs a 'name' (e.g. '- name: l1')")
        return v

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


# --------------------------------------------------------------------------------------------------
# loading


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats, so ``lambda: 1e-4`` is a number and not a string."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def safe_load_yaml(text: str) -> Any:
    """Parse YAML without executing anything (a SafeLoader), with YAML 1.2 floats."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - _RecipeLoader is a SafeLoader


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"recipe {str(path)!r} does not exist; check the path")
    try:
        data = safe_load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}{where}: YAML syntax error: {problem}") from None
    if data is None:
        raise UserError(f"{path}: the recipe is empty; see recipes/quickstart.yaml for the format")
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: the recipe must be a mapping of keys (name:, data:, ...), not a {type(data).__name__}"
        )
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _resolve_extends(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p.name) for p in (*seen, path))
        raise UserError(f"{seen[0]}: 'extends' cycle: {chain}; remove one of the links")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: must be a file path, got {parent!r}")
    ppath = (path.parent / os.path.expandvars(parent)).resolve()
    if not ppath.is_file():
        raise UserError(f"{path}: extends: parent recipe {parent!r} not found (looked at {ppath})")
    return _merge(_resolve_extends(ppath, (*seen, path)), data)


_KEY = re.compile(r"^([A-Za-z_][\w-]*)((?:\[\d+\])*)$")


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``key.path=value`` override in place (value parsed as YAML; ``methods[0].lambda`` works)."""
    if "=" not in override:
        raise UserError(f"override {override!r}: expected KEY=VALUE, e.g. -o finetune.epochs=2")
    key, raw = override.split("=", 1)
    try:
        value = safe_load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"override {override!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    steps: list[str | int] = []
    for part in key.strip().split("."):
        m = _KEY.match(part)
        if not m:
            raise UserError(
                f"override {override!r}: bad key {key!r}; use dotted names like prune.target or methods[0].lambda"
            )
        steps.append(m.group(1))
        steps.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    node: Any = data
    for i, step in enumerate(steps[:-1]):
        nxt = steps[i + 1]
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                raise UserError(f"override {override!r}: index [{step}] is out of range")
            node = node[step]
            continue
        if not isinstance(node, dict):
            raise UserError(f"override {override!r}: {step!r} is not inside a mapping")
        if step not in node or node[step] is None:
            node[step] = [] if isinstance(nxt, int) else {}
        node = node[step]
    last = steps[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise UserError(f"override {override!r}: index [{last}] is out of range")
    elif not isinstance(node, dict):
        raise UserError(f"override {override!r}: {'.'.join(map(str, steps[:-1]))!r} is not a mapping")
    node[last] = value


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names the schema allows at the parent of ``loc`` (for 'did you mean' hints)."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line: ``file: key.path: what is wrong`` (the first error, plus how many more there are)."""
    errs = exc.errors()
    e = errs[0]
    loc = tuple(
        p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "float", "int", "list[")))
    )
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
    if e["type"] == "extra_forbidden":
        msg = f"unknown key.{close_matches(str(loc[-1]), _fields_at(loc))}"
    elif e["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = e["msg"].removeprefix("Value error, ")
        if "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
    more = f" (+{len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def recipe_data(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe as plain data after ``extends`` and overrides, before validation."""
    data = _resolve_extends(Path(path))
    for ov in overrides:
        apply_override(data, ov)
    return data


def read_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, override and validate a recipe against the schema; every problem is a one-line
    :class:`UserError`. Method entries are checked against the registry by
    :func:`prunebench.registry.load_recipe`, which is what the commands call."""
    path = Path(path)
    data = recipe_data(path, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, str(path))) from None
    recipe._source = path  # type: ignore[attr-defined]
    return recipe


def method_label(spec: dict[str, Any]) -> str:
    """A short unique label for a method entry: its name, plus its parameters when it has any."""
    params = {k: v for k, v in spec.items() if k != "name"}
    if not params:
        return spec["name"]
    return spec["name"] + "(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what was really run, after extends and overrides)."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=False), sort_keys=False)
