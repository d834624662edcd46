"""Heuristic quality filters (Gopher repetition and quality, C4, FineWeb), run through datatrove's implementations.

Each rule set applies to the languages it is configured for (the rules are word-based and tuned for English by
default); a document in another language passes it untouched. Thresholds go to the datatrove class unchanged, so
the names in the YAML are the names in datatrove's documentation.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Literal

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from core.config import Strict
from stages.base import Stage

FILTER_CLASSES = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4": C4QualityFilter,
    "fineweb": FineWebQualityFilter,
}
_NOT_THRESHOLDS = {"self", "exclusion_writer", "language", "batch_size"}
_FRACTION_WORDS = ("ratio", "frac", "thr", "grams")  # thresholds on shares of a document: at most 1


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _numbers(value: Any) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def check_threshold(kind: str, name: str, value: Any) -> None:
    """A threshold has the type datatrove declares for it (no string where a number goes), is not negative, and a
    share of a document is at most 1. Raises ValueError naming the threshold."""
    annotation = inspect.signature(FILTER_CLASSES[kind].__init__).parameters[name].annotation
    arguments = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and len(arguments) == 1:  # datatrove's tuple[tuple[int, float]]
        annotation = tuple[arguments[0], ...]
    try:
        TypeAdapter(annotation).validate_python(_as_tuples(value), strict=True)
    except ValidationError as error:
        raise ValueError(f"{name}: {value!r} is not a {annotation} ({error.errors()[0]['msg']})") from None
    numbers = _numbers(value)
    if any(n < 0 for n in numbers):
        raise ValueError(f"{name}: {value!r} holds a negative number")
    if any(word in name for word in _FRACTION_WORDS) and any(isinstance(n, float) and n > 1 for n in numbers):
        raise ValueError(f"{name}: {value!r} holds a share above 1")


class FilterConfig(Strict):
    kind: Literal["gopher_repetition", "gopher_quality", "c4", "fineweb"]
    enabled: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"])
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def known_params(self) -> FilterConfig:
        accepted = set(inspect.signature(FILTER_CLASSES[self.kind].__init__).parameters) - _NOT_THRESHOLDS
        unknown = sorted(set(self.params) - accepted)
        if unknown:
            raise ValueError(f"{self.kind} has no threshold(s) {unknown}; accepted: {sorted(accepted)}")
        for name, value in self.params.items():
            check_threshold(self.kind, name, value)
        return self


def default_filters() -> list[FilterConfig]:
    return [FilterConfig(kind=kind) for kind in FILTER_CLASSES]


class HeuristicFilter(Stage):
    """One datatrove rule set; the drop reason is the rule that fired (e.g. ``gopher_short_doc``)."""

    def __init__(self, config: FilterConfig, accounting=None):
        super().__init__(accounting)
        self.name = f"filter_{config.kind}"
        self.filters = {
            language: FILTER_CLASSES[config.kind](language=language, **config.params) for language in config.languages
        }

    def process(self, doc: Document) -> Document | None:
        rule_set = self.filters.get(doc.metadata["language"])
        if rule_set is None:
            return doc
        verdict = rule_set.filter(doc)
        keep, reason = verdict if isinstance(verdict, tuple) else (verdict, "rejected")
        if keep:
            return doc
        self.drop(reason)
        return None
