"""Scoring documents with the quality classifier on Ray Data: one model load per actor, documents in batches.

``ScoreBatch`` is the callable class handed to ``Dataset.map_batches``: Ray constructs it once per actor of the
pool, so the (possibly gigabyte-sized) fastText model is read once per worker, not per batch. Each batch comes
and goes as a ``pyarrow.Table``; the score columns are appended without copying the documents.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field, PositiveInt

from core.config import Strict
from stages.classifier import LABEL_PREFIX, QualityClassifier

SCORE_COLUMN = "score"


class ScoringConfig(Strict):
    classifier: str | None = Field(
        None, description="classifier directory (or a root with `latest`); null: the newest in classifier.output_root"
    )
    input: str | None = Field(
        None, description="dataset version (or root) to score when run alone; null: output.root's latest"
    )
    text_column: str = "content"
    language_column: str = Field("language", description="routes each document to its language's classifier")
    batch_size: PositiveInt = Field(1024, description="documents per map_batches call")
    workers: PositiveInt | None = Field(None, description="scoring actors; null: one per CPU of the cluster")


def probability_columns(labels: dict[str, str]) -> list[str]:
    """Names of the per-label probability columns, positive label first: ``prob_<label>``."""
    return [f"prob_{labels[which].removeprefix(LABEL_PREFIX)}" for which in ("positive", "negative")]


def score_schema(parent: pa.Schema, labels: dict[str, str]) -> pa.Schema:
    for name in (SCORE_COLUMN, *probability_columns(labels)):
        if name in parent.names:
            raise ValueError(f"the dataset already has a {name!r} column: score a version that was not scored yet")
        parent = parent.append(pa.field(name, pa.float32()))
    return parent


class ScoreBatch:
    """``map_batches`` callable: ``score`` = P(positive label), plus one probability column per label.

    A document that is missing, preprocesses to nothing, or is in a language without a classifier gets null scores
    instead of a guess (the selection step counts and drops it); a huge one is scored on its first
    ``normalize.max_chars`` characters.
    """

    def __init__(self, classifier_path: str, text_column: str, language_column: str):
        self.classifier = QualityClassifier.load(classifier_path)
        self.text_column, self.language_column = text_column, language_column
        self.names = [SCORE_COLUMN, *probability_columns(self.classifier.labels)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        languages = (batch.column(self.language_column).to_pylist()
                     if self.language_column in batch.column_names else None)
        probs, _ = self.classifier.score(batch.column(self.text_column).to_pylist(), languages)
        missing = np.isnan(probs[:, 0])
        values = probs.astype(np.float32)
        for name, column in zip(self.names, (values[:, 0], values[:, 0], values[:, 1])):
            batch = batch.append_column(name, pa.array(column, mask=missing))
        return batch
