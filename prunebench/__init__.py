"""prunebench: a fair, reproducible benchmark harness for structured (channel) pruning of CNNs.

Public API (everything else is private and may change):

* :class:`PruningMethod`, :class:`MethodParams`, :class:`LambdaParams`, :class:`Calibration` -- the
  method plugin contract;
* :func:`register_method`, :func:`get_method`, :func:`available_methods` -- the method registry;
* :class:`PrunableGroup`, :class:`GroupMember` -- what a method scores and regularizes;
* :func:`load_recipe`, :class:`Recipe` -- typed recipes;
* :class:`UserError` -- errors a user can fix (the CLI exits with status 2 on them).
"""

from prunebench.errors import UserError
from prunebench.groups import GroupMember, PrunableGroup
from prunebench.method import Calibration, LambdaParams, MethodParams, PruningMethod
from prunebench.recipe import Recipe, load_recipe
from prunebench.registry import available_methods, get_method, register_method

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "GroupMember",
    "LambdaParams",
    "MethodParams",
    "PrunableGroup",
    "PruningMethod",
    "Recipe",
    "UserError",
    "available_methods",
    "get_method",
    "load_recipe",
    "register_method",
    "__version__",
]
