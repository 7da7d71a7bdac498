"""The attribute sets an upstream attempt's GenAI client metrics are recorded under.

Every attempt on one route (an upstream, the caller's model, the upstream's name for it)
records its duration, a stream's time to first chunk and, once the call's usage is
known, its input and output tokens under the same few attribute sets, which differ only
in the model its answer names. Built once as `AttributeSet`s and kept, each record is a
dict lookup in its histogram, where a dict of seven or eight attributes made into a
frozenset cost about 1 µs a record (three a call, and two more dicts for the tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry.util.types import AttributeValue

from service.telemetry.histograms import AttributeSet
from service.telemetry.tracing import GEN_AI_RESPONSE_MODEL, GEN_AI_TOKEN_TYPE, USAGE_ESTIMATED

# Answer models kept a route: the name is the upstream's to choose (a dated snapshot, a
# fine-tune), and one it changes on every answer must not grow the route without bound.
# Past it, an answer's sets are built for its attempt alone.
MOST_ANSWER_MODELS = 64


@dataclass(frozen=True, slots=True)
class AnswerLabels:
    """An attempt's metric attribute sets once its answer named its model, or while (or
    when) it has named none: then without `gen_ai.response.model`."""

    # `gen_ai.client.operation.duration` of an attempt that answered, and its time to
    # first chunk (one that failed records `error.type` as well).
    duration: AttributeSet
    # `gen_ai.client.token.usage` of its input and output tokens, by whether the counts
    # were reported or estimated (`llm_gateway.usage.estimated`).
    reported_tokens: tuple[AttributeSet, AttributeSet]
    estimated_tokens: tuple[AttributeSet, AttributeSet]

    @classmethod
    def of(cls, attributes: Mapping[str, AttributeValue]) -> AnswerLabels:
        """The sets built on an attempt's `attributes`."""

        def tokens(*, is_estimated: bool) -> tuple[AttributeSet, AttributeSet]:
            return (
                AttributeSet(
                    {**attributes, USAGE_ESTIMATED: is_estimated, GEN_AI_TOKEN_TYPE: "input"}
                ),
                AttributeSet(
                    {**attributes, USAGE_ESTIMATED: is_estimated, GEN_AI_TOKEN_TYPE: "output"}
                ),
            )

        return cls(
            duration=AttributeSet(attributes),
            reported_tokens=tokens(is_estimated=False),
            estimated_tokens=tokens(is_estimated=True),
        )


class RouteLabels:
    """A route's attributes on the GenAI client metrics (operation, provider, the caller's
    model and the upstream's, server address and port), and its attempts' `AnswerLabels`
    by the model their answers name (`answered[response_model]`), built on first use."""

    __slots__ = ("answered", "attributes", "unanswered")

    def __init__(self, attributes: Mapping[str, AttributeValue]) -> None:
        self.attributes = attributes  # not to be changed: the sets are built on it
        self.unanswered = AnswerLabels.of(attributes)
        self.answered = _AnswersByModel(attributes)


class _AnswersByModel(dict[str, AnswerLabels]):
    """A route's `AnswerLabels` by the model an answer names: indexed, a kept one is found
    without a call (every attempt that answers looks its model up)."""

    __slots__ = ("_attributes",)

    def __init__(self, attributes: Mapping[str, AttributeValue]) -> None:
        super().__init__()
        self._attributes = attributes

    def __missing__(self, response_model: str) -> AnswerLabels:
        labels = AnswerLabels.of({**self._attributes, GEN_AI_RESPONSE_MODEL: response_model})
        if len(self) < MOST_ANSWER_MODELS:
            self[response_model] = labels
        return labels
