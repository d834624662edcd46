"""Selection on classifier scores: keep documents above a threshold, or the top fraction (optionally per language).

Selection is two passes. ``cutoffs`` looks at every score once (only the ``score`` and ``language`` columns) and
turns either mode into a minimum score per language; ``select_table`` then applies those cutoffs to one shard at
a time, so shards are filtered independently and in parallel. A top-fraction cutoff is the score of the last
document inside the fraction; documents tied with it are all kept, so a fraction can be exceeded by ties only.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from core.config import Strict
from stages.scoring import SCORE_COLUMN

ALL_LANGUAGES = "*"


class SelectConfig(Strict):
    mode: Literal["threshold", "top_fraction"] = "threshold"
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="mode threshold: keep score >= threshold")
    top_fraction: float = Field(0.1, gt=0.0, le=1.0, description="mode top_fraction: keep this best fraction")
    per_language: bool = Field(False, description="top_fraction: rank each language separately")
    overrides: dict[str, float] = Field(
        default_factory=dict, description="per language: its own threshold or fraction (implies per_language)"
    )
    language_column: str = "language"
    split_by_language: bool = Field(
        True, description="one split per language (data/<language>/), as Ultra-FineWeb's en and zh splits"
    )
    input: str | None = Field(None, description="scored dataset version (or root) when run alone; null: latest")

    @model_validator(mode="after")
    def overrides_in_range(self) -> SelectConfig:
        for language, value in self.overrides.items():
            low_ok = value >= 0.0 if self.mode == "threshold" else value > 0.0
            if not (low_ok and value <= 1.0):
                raise ValueError(f"overrides.{language}: {value} is not a valid {self.mode} (0..1)")
        return self

    @property
    def by_language(self) -> bool:
        return self.per_language or bool(self.overrides)


def _top_cutoff(scores: np.ndarray, fraction: float) -> float:
    keep = math.ceil(fraction * len(scores))
    return float(np.sort(scores)[::-1][keep - 1]) if keep else math.inf


def cutoffs(config: SelectConfig, scores: np.ndarray, languages: np.ndarray | None) -> dict[str, float]:
    """Minimum score to keep, per language (``"*"``: every language without an entry of its own).

    ``scores`` holds the non-null scores; ``languages`` the matching languages (needed only per language).
    """
    if config.mode == "threshold":
        return {ALL_LANGUAGES: config.threshold, **config.overrides}
    if not config.by_language:
        return {ALL_LANGUAGES: _top_cutoff(scores, config.top_fraction)}
    if languages is None:
        raise ValueError(f"per-language selection needs the {config.language_column!r} column")
    result = {}
    for language in sorted(set(languages.tolist())):
        fraction = config.overrides.get(language, config.top_fraction)
        result[language] = _top_cutoff(scores[languages == language], fraction)
    return result


def language_values(table: pa.Table, language_column: str) -> np.ndarray:
    """The language of each row as strings, a missing language as ``""``."""
    if language_column not in table.column_names:
        raise ValueError(f"per-language selection needs the {language_column!r} column (columns: {table.column_names})")
    return pc.fill_null(table.column(language_column), "").to_numpy(zero_copy_only=False)


def select_table(table: pa.Table, cutoff_by_language: dict[str, float], language_column: str) -> tuple[pa.Table, Counter]:
    """The rows at or above their language's cutoff; the others counted by reason (``no_score``, ``below_cutoff``)."""
    scores = table.column(SCORE_COLUMN)
    if set(cutoff_by_language) == {ALL_LANGUAGES}:
        minimum = pa.array(np.full(len(table), cutoff_by_language[ALL_LANGUAGES], dtype=np.float64))
    else:
        languages = language_values(table, language_column)
        fallback = cutoff_by_language.get(ALL_LANGUAGES, math.inf)  # a language ranked on its own but unseen: none kept
        minimum = pa.array(np.array([cutoff_by_language.get(lang, fallback) for lang in languages], dtype=np.float64))
    has_score = pc.is_valid(scores)
    keep = pc.and_(has_score, pc.greater_equal(pc.cast(scores, pa.float64()), minimum)).fill_null(False)
    kept = table.filter(keep)
    dropped = Counter()
    no_score = len(table) - (pc.sum(pc.cast(has_score, pa.int64())).as_py() or 0)
    if no_score:
        dropped["no_score"] = no_score
    below = len(table) - len(kept) - no_score
    if below:
        dropped["below_cutoff"] = below
    return kept, dropped
