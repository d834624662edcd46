"""The score step: a dataset version -> a scored version (``score`` and the label probabilities added).

Scoring runs on Ray Data: the parent's shards are read with ``read_parquet``, ``ScoreBatch`` actors (one model
load each) add ``score`` and the label probabilities, and the driver streams the batches, in order, into
``rows_per_shard`` shards of the version's directory, whose manifest is written last. Keeping the order makes the
shards byte-identical on a re-run whatever the scheduling.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from core.io import atomic_path
from core.manifest import describe_shard
from core.runtime import ensure_ray
from core.storage import AnyPath, arrow_dataset_source, parquet_schema
from core.versions import SHARD_DIR, DatasetVersion
from pipelines.config import UltraCleanConfig
from pipelines.derived import DerivedVersion, StepResult
from stages.classifier import QualityClassifier
from stages.scoring import SCORE_COLUMN, ScoreBatch, score_schema

# The code that shapes a scored version: how documents are normalised and scored, and this job.
SCORE_CODE = ("stages.scoring", "stages.classifier", "stages.normalize", "pipelines.score")


class ShardWriter:
    """Rows in arrival order into ``shard-NNNNN.parquet`` files of ``rows_per_shard`` rows each."""

    def __init__(self, directory: AnyPath, schema: pa.Schema, config: UltraCleanConfig):
        self.directory, self.schema, self.config = directory, schema, config
        self.paths: list[AnyPath] = []
        self._writer: pq.ParquetWriter | None = None
        self._target: contextlib.ExitStack | None = None
        self._rows = 0

    def _open(self) -> None:
        path = self.directory / f"shard-{len(self.paths):05d}.parquet"
        self.paths.append(path)
        self._target = contextlib.ExitStack()
        tmp = self._target.enter_context(atomic_path(path))
        self._writer = pq.ParquetWriter(tmp, self.schema, **self.config.output.parquet_options())
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema)
        while len(table):
            if self._writer is None or self._rows == self.config.output.rows_per_shard:
                self.close()
                self._open()
            take = table.slice(0, self.config.output.rows_per_shard - self._rows)
            self._writer.write_table(take, row_group_size=self.config.output.row_group_rows)
            self._rows += len(take)
            table = table.slice(len(take))

    def close(self) -> None:
        """Finish the open shard (its file appears complete, or not at all when ``close`` runs on an error)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._target.close()


def score_version(
    config: UltraCleanConfig, parent_path: str | os.PathLike, classifier_path: str | os.PathLike,
    output_root: str | os.PathLike | None = None
) -> StepResult:
    """Score every document of a dataset version into a new version with ``score`` and probability columns."""
    started = time.perf_counter()
    scoring = config.scoring
    parent = DatasetVersion.open(parent_path)
    expected = config.classifier.labels if config.classifier else None
    classifier = QualityClassifier.load(classifier_path, expected_labels=expected)  # fail here, not in an actor
    parent_schema = parquet_schema(parent.shard_paths[0]) if parent.shard_paths else None
    if parent_schema is not None and scoring.text_column not in parent_schema.names:
        raise ValueError(f"scoring.text_column: {parent.path} has no {scoring.text_column!r} column ({parent_schema.names})")
    step_config = {**scoring.model_dump(mode="json", exclude={"classifier", "input", "workers", "batch_size"}),
                   "classifier_id": classifier.classifier_id}
    derived = DerivedVersion.plan(config, parent, "score", step_config, SCORE_CODE, output_root)
    with derived.writing() as version_dir:
        if version_dir is None:
            return derived.reused(started)
        schema = score_schema(parent_schema, classifier.labels) if parent_schema is not None else pa.schema([])
        writer = ShardWriter(version_dir / SHARD_DIR, schema, config)
        unscored = no_model = truncated = 0
        max_chars = classifier.normalizer.config.max_chars
        try:
            if parent.manifest["totals"]["rows"]:
                ensure_ray(config.ray.address, config.ray.num_cpus)
                for batch in tqdm(_scored_batches(parent, classifier, config), desc="score: batches", unit="batch"):
                    writer.write(batch)
                    unscored += batch.column(SCORE_COLUMN).null_count
                    if scoring.language_column in batch.column_names:
                        languages = batch.column(scoring.language_column).to_pylist()
                        no_model += sum(classifier.model_for(language) is None for language in languages)
                    lengths = pc.utf8_length(batch.column(scoring.text_column))
                    truncated += pc.sum(pc.cast(pc.greater(lengths, max_chars), pa.int64())).as_py() or 0
        finally:
            writer.close()
        shards = [describe_shard(p, version_dir, config.output.tokenizer, scoring.text_column) for p in writer.paths]
        extra = {
            "classifier": {"classifier_id": classifier.classifier_id, "path": str(classifier.path),
                           "labels": classifier.labels,
                           "metrics": {lang: e["metrics"] for lang, e in classifier.metadata["languages"].items()}},
            "scoring": {"scored": sum(s["rows"] for s in shards) - unscored, "empty": unscored - no_model,
                        "no_classifier_for_language": no_model, "truncated": truncated},
        }
        final, manifest = derived.publish(version_dir, config, schema, shards, Counter(), extra)
    return StepResult(final, manifest, reused=False, seconds=time.perf_counter() - started)


def _scored_batches(parent: DatasetVersion, classifier: QualityClassifier, config: UltraCleanConfig):
    scoring = config.scoring
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shard contents must not depend on which actor finished first
    context.enable_progress_bars = False
    workers = scoring.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Reading Parquet is light next to scoring; reads that asked for a CPU would wait forever for the CPUs that
    # the scoring actors hold when there is one actor per CPU. The V2 datasource adds a file-listing task that
    # always asks for one, so the V1 reader (plain read tasks that take num_cpus) is used.
    context.use_datasource_v2 = False
    dataset = ray.data.read_parquet(**arrow_dataset_source(parent.shard_paths), num_cpus=0)
    dataset = dataset.map_batches(
        ScoreBatch,
        fn_constructor_kwargs={"classifier_path": str(classifier.path), "text_column": scoring.text_column,
                               "language_column": scoring.language_column},
        batch_size=scoring.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    yield from dataset.iter_batches(batch_format="pyarrow", batch_size=None)


