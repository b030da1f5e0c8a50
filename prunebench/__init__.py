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
"""

from prunebench.errors import UserError
from prunebench.groups import GroupMember, PrunableGroup
from prunebench.method import Calibration, LambdaParams, MethodParams, PruningMethod
from prunebench.norms import ChannelSlice, GroupSlices, group_slices, member_slice
from prunebench.recipe import Recipe
from prunebench.registry import available_methods, get_method, load_recipe, register_method

__version__ = "0.1.0"

__all__ = [
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
    "available_methods",
    "get_method",
    "group_slices",
    "load_recipe",
    "member_slice",
    "register_method",
    "__version__",
]
