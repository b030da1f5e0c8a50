"""Search spaces: how a recipe writes the values ``prunebench tune`` searches for a method parameter,
either inline (``lambda: {tune: [1e-6, 1e-3], log: true}``) or in the ``tune.spaces`` section. See the
README ("Tuning") for the user's side.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SearchSpace(BaseModel):
    """The range (or the choices) ``prunebench tune`` searches for one method parameter.

    ``low``/``high`` give a float range (an int range when both are integers), sampled on a log scale
    with ``log: true``; ``choices`` gives a categorical parameter instead.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)

    low: float | int | None = None
    high: float | int | None = None
    log: bool = Field(False, description="sample uniformly in log space (regularization factors: true)")
    step: float | int | None = Field(None, gt=0, description="discretization step of the range (not with log)")
    choices: list[Any] | None = Field(None, min_length=1, description="categorical values instead of a range")

    @model_validator(mode="after")
    def _one_form(self) -> SearchSpace:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a search space has either choices or low/high (with log/step), not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError(
                "a search space needs low and high (e.g. {low: 1.0e-6, high: 1.0e-2, log: true}) or choices"
            )
        if not self.low <= self.high:
            raise ValueError(f"search space low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale search space needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("a search space cannot have both log: true and a step")
        return self

    @property
    def ends(self) -> list[Any]:
        """The values that bound the space (every choice, or low and high): all must be valid values."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high)) and (
            self.step is None or isinstance(self.step, int)
        )


def is_search_space(value: Any) -> bool:
    """Whether a method parameter is written as a search space (``lambda: {tune: [1e-6, 1e-3], log: true}``)."""
    return isinstance(value, dict) and "tune" in value


def parse_search_space(value: dict[str, Any]) -> SearchSpace:
    """A method parameter's inline space: ``{tune: [low, high], log:, step:}`` or ``{tune: {choices: [...]}}``."""
    rest = {k: v for k, v in value.items() if k != "tune"}
    spec = value["tune"]
    if isinstance(spec, list):
        if len(spec) != 2:
            raise ValueError(
                f"tune: [low, high] needs exactly two numbers (got {spec!r}); "
                "write tune: {choices: [...]} for a categorical parameter"
            )
        return SearchSpace.model_validate({"low": spec[0], "high": spec[1], **rest})
    if isinstance(spec, dict):
        return SearchSpace.model_validate({**spec, **rest})
    raise ValueError(f"tune: expects [low, high] or a mapping such as {{choices: [...]}} (got {spec!r})")
