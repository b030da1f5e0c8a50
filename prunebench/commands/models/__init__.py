"""``prunebench models --check``: a model-zoo report -- which timm CNNs the harness can prune, how far, and
where it cannot, why.

For each model (one per family by default, :data:`DEFAULT_MODELS`), built by timm with random weights (nothing
is downloaded): the number of prunable groups per scope (:func:`prunebench.groups.build_groups`) and the seconds
to build them, the largest MACs reduction each scope reaches under the recipe's default cap
(:func:`prunebench.reach.measure_reach`), and whether every registered method cuts a fresh copy to 30% and 50%
fewer MACs (:func:`prunebench.engine.prune_to_target` in scope ``auto``, resolved as ``prunebench run`` does).
Whatever fails is reported in words (the one-line error), never as a crash. The modules: ``config``
(:class:`ZooConfig`, the default models, :func:`resolve_models`), ``check`` (one model), ``report`` (JSON and
Markdown, written atomically) and ``runner`` (:func:`check_models`). The command line is
:mod:`prunebench.cli.models`; the report in the repository is reports/timm/.
"""

from prunebench.commands.models.check import ON_TARGET, Cut, ModelCheck, check_model, reason
from prunebench.commands.models.config import DEFAULT_CAP, DEFAULT_MODELS, DEFAULT_TARGETS, ZooConfig, resolve_models
from prunebench.commands.models.report import build_document, format_summary, render_markdown, write_report
from prunebench.commands.models.runner import check_models

__all__ = [
    "DEFAULT_CAP",
    "DEFAULT_MODELS",
    "DEFAULT_TARGETS",
    "ON_TARGET",
    "Cut",
    "ModelCheck",
    "ZooConfig",
    "build_document",
    "check_model",
    "check_models",
    "format_summary",
    "reason",
    "render_markdown",
    "resolve_models",
    "write_report",
]
