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
"""

from __future__ import annotations

import importlib
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
