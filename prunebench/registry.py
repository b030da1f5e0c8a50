"""The method registry: built-ins, entry-point plugins and plugin files.

Built-in methods live in ``prunebench.methods`` (the top-level ``methods/`` folder) and are imported by
an explicit list there. Third-party packages register through the entry-point group
``prunebench.methods`` (loaded lazily, the first time a name is looked up; a broken plugin warns and
names itself while the rest keep working). A recipe may also name plugin files (``plugins: [file.py]``),
which run only because they were named. Duplicate and unknown names fail loudly with the list of what
exists (the fvcore/detectron2 registry convention).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from prunebench.errors import UserError, close_matches
from prunebench.method import PruningMethod
from prunebench.recipe import Recipe, method_label, read_recipe
from prunebench.spaces import is_search_space, parse_search_space

ENTRY_POINT_GROUP = "prunebench.methods"
RESERVED_NAMES = {"dense_control": "the runs of each seed's dense control carry it as their method"}

_METHODS: dict[str, type[PruningMethod]] = {}
_BROKEN: dict[str, tuple[str, Exception]] = {}  # entry-point name -> (its value, the import error)
_loaded = False

M = TypeVar("M", bound=type[PruningMethod])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`PruningMethod` subclass under ``name``.

    Registering a different class under a name that exists is an error; registering the same class
    again (a plugin file loaded twice) is not.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"method name {name!r} must be letters, digits, '_' or '-'")
    if name in RESERVED_NAMES:
        raise ValueError(f"method name {name!r} is reserved ({RESERVED_NAMES[name]}); choose another name")

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
            raise TypeError(f"@register_method({name!r}) must decorate a PruningMethod subclass")
        old = _METHODS.get(name)
        if old is not None and _identity(old) != _identity(cls):
            raise UserError(
                f"method name {name!r} is already registered by {_identity(old)}; choose another name "
                f"(registered: {', '.join(sorted(_METHODS))})"
            )
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _identity(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _ensure_loaded() -> None:
    """Import the built-ins and the entry-point plugins once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("prunebench.methods")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the others down
            _BROKEN[ep.name] = (ep.value, exc)
            warnings.warn(
                f"prunebench: method plugin {ep.name!r} ({ep.value}) failed to load and is skipped: "
                f"{type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )


def available_methods() -> dict[str, type[PruningMethod]]:
    """All registered methods by name (built-ins, entry points and plugin files loaded so far)."""
    _ensure_loaded()
    return dict(sorted(_METHODS.items()))


def broken_methods() -> dict[str, str]:
    """Entry-point methods whose plugin failed to import (name -> why), unless something else registered
    the name. Recipes may name them: only their cells fail (see README "Resuming and failures")."""
    _ensure_loaded()
    return {
        n: f"plugin {value} failed to import: {type(exc).__name__}: {exc}"
        for n, (value, exc) in _BROKEN.items()
        if n not in _METHODS
    }


def get_method(name: str) -> type[PruningMethod]:
    """The method class registered as ``name``; an unknown or broken name is a :class:`UserError`."""
    methods = available_methods()
    if name not in methods:
        broken = broken_methods()
        if name in broken:
            raise UserError(
                f"method {name!r} is unavailable: {broken[name]}; fix or reinstall that package"
            ) from _BROKEN[name][1]
        raise UserError(f"unknown method {name!r}.{close_matches(name, methods)}")
    return methods[name]


def build_method(spec: dict[str, Any], where: str = "methods") -> PruningMethod:
    """Instantiate a method from a recipe entry ``{name: ..., <params>}``, validating its parameters.

    ``where`` is the key path used in error messages (e.g. ``recipe.yaml: methods[2]``).
    """
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise UserError(f"{where}: every method entry needs a 'name' (e.g. '- name: l1')")
    try:
        cls = get_method(name)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    try:
        params = cls.Params.model_validate(spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = [f.alias or k for k, f in cls.Params.model_fields.items()]
            raise UserError(
                f"{where}.{key}: method {name!r} has no parameter {key!r}"
                f"{close_matches(key, known) if known else ' (it takes no parameters)'}"
            ) from None
        raise UserError(f"{where}.{key}: {err['msg']} (got {err.get('input')!r})") from None
    return cls(params)


def load_plugin_file(path: str | Path) -> list[str]:
    """Run a plugin file named by the user and return the method names it registered."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"plugin file {str(path)!r} does not exist; fix the path in 'plugins:'")
    _ensure_loaded()
    before = {n: c for n, c in _METHODS.items()}
    mod_name = f"prunebench_plugin_{p.stem}_{abs(hash(str(p.resolve()))) % 10**8}"
    if mod_name in sys.modules:  # loaded already (e.g. by a previous recipe in this process)
        return [n for n, c in _METHODS.items() if c.__module__ == mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, p)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except UserError:
        del sys.modules[mod_name]
        raise
    except Exception as exc:
        del sys.modules[mod_name]
        raise UserError(f"plugin file {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from None
    new = [n for n, c in _METHODS.items() if before.get(n) is not c]
    if not new:
        raise UserError(
            f"plugin file {str(path)!r} registers no method; decorate a PruningMethod subclass with "
            "@prunebench.register_method('name')"
        )
    return new


# -- recipes: their plugin files and method entries --------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, allow_spaces: bool = False) -> Recipe:
    """Read a recipe (:func:`prunebench.recipe.read_recipe`), load its plugin files and validate every method
    entry against its parameter model; every problem is a one-line :class:`UserError`.

    ``allow_spaces`` accepts method parameters written as search spaces (``prunebench tune`` only).
    """
    recipe = read_recipe(path, overrides)
    validate_methods(recipe, base_dir=Path(path).parent, allow_spaces=allow_spaces)
    return recipe


def resolve_plugin_path(plugin: str, base_dir: Path) -> Path:
    """A plugin path as written in a recipe: relative to the working directory, else to the recipe."""
    p = Path(os.path.expandvars(plugin)).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return base_dir / p


def validate_methods(recipe: Recipe, base_dir: Path, *, allow_spaces: bool = False) -> None:
    """Load the recipe's plugin files and validate every method entry against its parameter model.

    A parameter written as a search space is an error (run ``prunebench tune`` first) unless
    ``allow_spaces``; then both ends of the range (or every choice) are validated instead.
    """
    src = str(getattr(recipe, "_source", "recipe"))
    for plugin in recipe.plugins:
        path = resolve_plugin_path(plugin, base_dir)
        if not path.is_file():
            raise UserError(
                f"{src}: plugins: plugin file {plugin!r} does not exist (looked in the working "
                "directory and beside the recipe); fix the path"
            )
        try:
            load_plugin_file(path)
        except UserError as exc:
            raise UserError(f"{src}: plugins: {exc}") from None
    broken = broken_methods()  # an installed plugin that fails to import fails its cells, not the recipe
    for i, spec in enumerate(recipe.methods):
        where = f"{src}: methods[{i}]"
        if spec["name"] in broken:
            continue
        spaces = {k: v for k, v in spec.items() if is_search_space(v)}
        if spaces and not allow_spaces:
            key = next(iter(spaces))
            raise UserError(
                f"{where}.{key}: is a search space; run `prunebench tune {src}` first and then "
                f"`prunebench run` on the tuned recipe it writes (or give {key} a value)"
            )
        ends: dict[str, list[Any]] = {}
        for key, raw in spaces.items():
            try:
                space = parse_search_space(raw)
            except (ValueError, ValidationError) as exc:
                msg = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
                raise UserError(f"{where}.{key}: {msg.removeprefix('Value error, ')}") from None
            ends[key] = space.ends
        base = {**spec, **{k: v[0] for k, v in ends.items()}}
        build_method(base, where=where)
        for key, values in ends.items():  # every end of every range must be a valid value
            for value in values[1:]:
                build_method({**base, key: value}, where=where)
    names = [m["name"] for m in recipe.methods]
    labels = [method_label(m) for m in recipe.methods]
    if len(set(labels)) != len(labels):
        raise UserError(f"{src}: methods: the same method with the same parameters is listed twice ({names})")
