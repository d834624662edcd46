"""Heuristic quality filters (Gopher repetition and quality, C4, FineWeb), run through datatrove's implementations.

Each rule set applies to the languages it is configured for (the rules are word-based and tuned for English by
default); a document in another language passes it untouched. Thresholds go to the datatrove class unchanged, so
the names in the YAML are the names in datatrove's documentation.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from pydantic import Field, model_validator

from core.config import Strict
from stages.base import Stage

FILTER_CLASSES = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4": C4QualityFilter,
    "fineweb": FineWebQualityFilter,
}
_NOT_THRESHOLDS = {"self", "exclusion_writer", "language", "batch_size"}


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
