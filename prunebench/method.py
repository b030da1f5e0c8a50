"""The method plugin contract: :class:`PruningMethod` and its parameter models.

A method owns only its scientific difference -- a sparsity regularizer and/or a way to choose channels.
Everything else (dense start, training loop, pruning engine, fine-tuning, measurement) is shared, which
is what keeps a comparison fair. Every hook is a no-op by default, so a simple method is a score
function and a registration; see the README section "Writing a method plugin".

Hook order during sparsity training, for every step::

    loss = task_loss + method.penalty()      # differentiable regularizer (or None)
    loss.backward(); method.after_backward() # e.g. slimming's sign(gamma) subgradient
    optimizer.step(); method.after_step(lr)  # e.g. a proximal shrinkage that gives exact zeros
    ... method.on_epoch_end(epoch)

Hooks must not synchronise with the device (no ``.item()``): they run every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from prunebench.groups import PrunableGroup


class MethodParams(BaseModel):
    """Validated parameters of a method: a recipe entry ``{name: m, key: value}`` minus ``name``.

    Unknown keys are errors. Subclass it and set ``Params`` on the method class.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class LambdaParams(MethodParams):
    """Parameters of a method with a regularization factor, written ``lambda`` in recipes."""

    lambda_: float = Field(1e-4, alias="lambda", ge=0, description="regularization factor")


@dataclass
class Calibration:
    """What a calibration-based method sees when it selects channels (e.g. ThiNet).

    ``batches`` are normalized input images on the model's device, drawn from the training split
    (never validation or test); the model is in eval mode.
    """

    model: nn.Module
    batches: list[Tensor]


P = TypeVar("P", bound=MethodParams)


class PruningMethod(Generic[P]):
    """Base class of every pruning method (see the module docstring for the hook order).

    Generic over its parameter model: ``class MyMethod(PruningMethod[MyParams])`` sets ``Params`` to
    ``MyParams`` and types ``self.params`` as ``MyParams`` (a plain ``PruningMethod`` has no parameters).

    Class attributes a subclass sets:

    * ``name`` -- filled in by :func:`prunebench.register_method`;
    * ``description`` -- one line for ``prunebench methods``;
    * ``Params`` -- set from the generic argument (or assigned explicitly); default: no parameters;
    * ``normalize`` -- how the engine normalizes scores within a layer before the global ranking:
      ``None`` (compare raw scores across layers), ``"max"`` or ``"sum"``;

    How channels are chosen follows from which method the subclass defines -- one switch, not two:
    overriding :meth:`score` gives a global ranking across groups; overriding :meth:`select` makes the
    method *calibrated* (:attr:`calibrated`): the engine removes the same fraction of every group (chosen
    so the network meets the MACs target) and ``select`` picks the channels from calibration data.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    normalize: ClassVar[Literal["max", "sum"] | None] = None
    calibrated: ClassVar[bool] = False
    """Set for you: ``True`` when the class overrides :meth:`select` (uniform plan, calibration data)."""

    params: P

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.calibrated = cls.select is not PruningMethod.select
        if "Params" in cls.__dict__:
            return
        for base in cls.__dict__.get("__orig_bases__", ()):
            args = [a for a in get_args(base) if isinstance(a, type) and issubclass(a, MethodParams)]
            if args:
                cls.Params = args[0]

    def __init__(self, params: P | None = None) -> None:
        self.params = params if params is not None else self.Params()  # type: ignore[assignment]
        self.model: nn.Module | None = None
        self.groups: list[PrunableGroup] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, groups: Sequence[PrunableGroup]) -> None:
        """Called before sparsity training and again after every pruning step (the groups change)."""
        self.model = model
        self.groups = list(groups)

    # -- sparsity-training hooks (no-ops by default) ---------------------------------------------
    def penalty(self) -> Tensor | None:
        """A differentiable term added to the loss, or ``None``."""
        return None

    def after_backward(self) -> None:
        """Called after ``loss.backward()``, before the optimizer step (gradients may be edited)."""

    def after_step(self, lr: float) -> None:
        """Called after the optimizer step with the step's learning rate (e.g. proximal shrinkage)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called at the end of every sparsity-training epoch."""

    # -- sparsity diagnostics (methods with a regularizer; see docs/fairness.md) -----------------
    def regularized_norms(self) -> list[Tensor]:
        """Per group, the norm of every channel's regularized weights: what the regularizer drives to zero
        (OICSR: the out-in group; slimming: ``|gamma|``). Empty for a method without a sparsity regularizer,
        which is what marks a method as *regularized* for the diagnostics."""
        return []

    def pull_per_lr(self, momentum: float) -> float:
        """The largest shrinkage of one regularized norm per unit of learning rate at the steady state:
        ``lambda``, times ``1/(1-momentum)`` when the pull goes through the gradient (SGD momentum
        amplifies it), not when it is a proximal step. ``0`` without a regularizer."""
        return 0.0

    def regularizer_value(self) -> Tensor | None:
        """The regularizer's current value (``lambda`` times the sparsity norm), also when it is not a loss
        term (proximal steps, slimming's subgradient); ``None`` without a regularizer. Called once per
        epoch, never per step."""
        return self.penalty()

    # -- pruning ---------------------------------------------------------------------------------
    def score(self, group: PrunableGroup) -> Tensor:
        """One importance score per channel of ``group`` (shape ``[group.size]``); higher = keep."""
        raise NotImplementedError(f"method {self.name!r} defines neither score() nor select()")

    def select(self, group: PrunableGroup, n_remove: int, calib: Calibration) -> Tensor | None:
        """Choose ``n_remove`` channels of ``group`` to remove from calibration data.

        Return their indices (LongTensor) or ``None`` to fall back on :meth:`score`. May rewrite the
        kept weights (e.g. a least-squares reconstruction of the consumer layer). Overriding it makes the
        method :attr:`calibrated`.
        """
        return None

    @classmethod
    def has_sparsity_training(cls) -> bool:
        """Whether any sparsity-training hook is overridden (otherwise that stage is plain training)."""
        hooks = ("penalty", "after_backward", "after_step", "on_epoch_end")
        return any(getattr(cls, h) is not getattr(PruningMethod, h) for h in hooks)

    def param_dict(self) -> dict[str, object]:
        """The parameters as written in a recipe (aliases such as ``lambda``), for logging."""
        return self.params.model_dump(by_alias=True)
