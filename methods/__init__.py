"""Built-in method plugins, one file each, imported by this explicit list (see docs/architecture.md).

Installed as ``prunebench.methods``. Third-party methods do not go here: they register through the
``prunebench.methods`` entry-point group or a plugin file named in a recipe.
"""

from prunebench.methods import (  # noqa: F401  (importing registers them)
    group_lasso,
    l1,
    oicsr,
    random_control,
    slimming,
    thinet,
)

__all__ = ["group_lasso", "l1", "oicsr", "random_control", "slimming", "thinet"]
