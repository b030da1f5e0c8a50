"""prunebench: a fair, reproducible benchmark harness for structured (channel) pruning of CNNs.

Public API (everything else is internal and may change; the layout is docs/architecture.md):

* :class:`PruningMethod`, :class:`MethodParams`, :class:`LambdaParams`, :class:`Calibration` -- the
  method plugin contract;
* :func:`register_method`, :func:`get_method`, :func:`available_methods` -- the method registry;
* :class:`PrunableGroup`, :class:`GroupMember` -- what a method scores and regularizes;
* :func:`group_slices`, :func:`member_slice`, :class:`GroupSlices`, :class:`ChannelSlice` -- per-channel
  norms of a group's weights, shared by the built-in methods and plugins;
* :func:`load_recipe`, :class:`Recipe` -- typed recipes;
* :class:`UserError` -- errors a user can fix (the CLI exits with status 2 on them).

The names are imported on first use (PEP 562), so ``import prunebench`` -- and the command line's
``--help`` -- do not pay for torch until something needs it.

CIFAR models in timm's registry
-------------------------------
``import prunebench`` makes ``timm.create_model("resnet56_cifar")`` work without importing torch or timm
itself: :mod:`prunebench.models` (which registers the CIFAR models) is imported as soon as timm is. If timm
is already imported, that happens here; otherwise a finder in ``sys.meta_path`` (:class:`_RegisterOnImport`)
watches the imports of ``timm``, ``torch_pruning`` and every ``prunebench.*`` module, and imports
``prunebench.models`` once timm has loaded and none of the watched modules is still loading: torch-pruning
imports timm itself, so ``import prunebench.engine`` loads timm halfway through torch-pruning and through
the prunebench modules that ``prunebench.models`` needs. The finder only wraps those modules' loaders (each
module keeps its own loader) and removes itself once the models are registered.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "UserError": "prunebench.errors",
    "GroupMember": "prunebench.groups",
    "PrunableGroup": "prunebench.groups",
    "Calibration": "prunebench.method",
    "LambdaParams": "prunebench.method",
    "MethodParams": "prunebench.method",
    "PruningMethod": "prunebench.method",
    "ChannelSlice": "prunebench.norms",
    "GroupSlices": "prunebench.norms",
    "group_slices": "prunebench.norms",
    "member_slice": "prunebench.norms",
    "Recipe": "prunebench.recipe",
    "available_methods": "prunebench.registry",
    "get_method": "prunebench.registry",
    "load_recipe": "prunebench.registry",
    "register_method": "prunebench.registry",
}

__all__ = [  # noqa: F822  (resolved by __getattr__)
    "Calibration",
    "ChannelSlice",
    "GroupMember",
    "GroupSlices",
    "LambdaParams",
    "MethodParams",
    "PrunableGroup",
    "PruningMethod",
    "Recipe",
    "UserError",
    "__version__",
    "available_methods",
    "get_method",
    "group_slices",
    "load_recipe",
    "member_slice",
    "register_method",
]

if TYPE_CHECKING:
    from prunebench.errors import UserError
    from prunebench.groups import GroupMember, PrunableGroup
    from prunebench.method import Calibration, LambdaParams, MethodParams, PruningMethod
    from prunebench.norms import ChannelSlice, GroupSlices, group_slices, member_slice
    from prunebench.recipe import Recipe
    from prunebench.registry import available_methods, get_method, load_recipe, register_method


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prunebench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


# -- CIFAR models registered when timm is imported (see the module docstring) ----------------------

_MODELS = "prunebench.models"
_LOADING: set[str] = set()  # watched modules whose code is running now


def _watched(name: str) -> bool:
    return name in ("timm", "torch_pruning") or name.startswith("prunebench.")


def _register_models() -> None:
    """Import :mod:`prunebench.models` once timm is loaded and no watched module is still loading."""
    if _MODELS in sys.modules:  # registered, or registering: it imports timm itself
        _RegisterOnImport.remove()
        return
    if "timm" not in sys.modules or _LOADING:
        return  # the last watched module to finish loading calls again
    _RegisterOnImport.remove()
    try:
        importlib.import_module(_MODELS)
    except Exception as exc:  # timm itself must keep working; the CIFAR models are then unknown names
        logging.getLogger(__name__).warning("prunebench: CIFAR models not registered into timm: %s", exc)


class _RegisterOnImport:
    """A ``sys.meta_path`` finder that runs :func:`_register_models` after each watched module has loaded."""

    @classmethod
    def install(cls) -> None:
        if not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.insert(0, cls())

    @classmethod
    def remove(cls) -> None:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, cls)]

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if not _watched(name):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if finder is not self and find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister:
    """A loader that runs the module's own loader, then :func:`_register_models`; the module keeps its
    own loader as ``__loader__`` and ``__spec__.loader``."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, is_package...: runpy (python -m) needs them
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        _LOADING.add(module.__name__)
        try:
            self.loader.exec_module(module)
        finally:
            _LOADING.discard(module.__name__)
        _register_models()


_RegisterOnImport.install()
if "timm" in sys.modules:
    _register_models()
