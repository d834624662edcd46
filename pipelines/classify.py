"""UltraClean classify and select: a dataset version -> a scored version -> a selected version.

Scoring runs on Ray Data: the parent's shards are read with ``read_parquet``, ``ScoreBatch`` actors (one model
load each) add ``score`` and the label probabilities, and the driver streams the batches, in order, into
``rows_per_shard`` shards of a staging directory that is published whole. Keeping the order makes the shards
byte-identical on a re-run whatever the scheduling. Selection computes a cutoff per language from the score
column alone, then filters each scored shard in its own Ray task. Each new version records its parent, the
classifier and the config, and its manifest accounts for every parent row (kept or dropped with a reason).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from pipelines.config import UltraCleanConfig
from pipelines.runtime import ensure_ray, gather
from pipelines.versioning import (
    CARD_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SHARD_DIR,
    DatasetVersion,
    atomic_write_text,
    canonical_json,
    code_version,
    compute_version_id,
    dataset_card,
    describe_shard,
    publish_version,
    shard_totals,
)
from stages.classifier import QualityClassifier
from stages.scoring import SCORE_COLUMN, ScoreBatch, score_schema
from stages.select import cutoffs, language_values, select_table


@dataclass
class StepResult:
    version_path: Path
    manifest: dict
    reused: bool
    seconds: float


def derived_manifest(
    *, version_id: str, config: UltraCleanConfig, parent: DatasetVersion, step: str, step_config: dict,
    schema: pa.Schema, shards: list[dict], dropped: Counter, extra: dict,
) -> dict:
    """The ingest manifest's shape for a version made from one parent; fails unless every parent row is accounted."""
    records_in = parent.manifest["totals"]["rows"]
    kept = sum(s["rows"] for s in shards)
    if records_in != kept + sum(dropped.values()):
        raise RuntimeError(f"{step}: accounting does not add up: {records_in} in != {kept} kept + {dict(dropped)} dropped")
    return {
        "format": MANIFEST_FORMAT,
        "version_id": version_id,
        "name": config.name,
        "parent": parent.version_id,
        "code_version": code_version(),
        "inputs": [{"version_id": parent.version_id, "rows": records_in}],
        "config": {step: step_config},
        "schema": {f.name: str(f.type) for f in schema},
        "shards": shards,
        "totals": shard_totals(shards),
        "accounting": {"records_in": records_in, "kept": kept, "dropped": sum(dropped.values()), "quarantined": 0,
                       "quarantine_entries": 0},
        "stages": [{"stage": step, "in": records_in, "out": kept, "dropped": dict(sorted(dropped.items())),
                    "quarantined": 0}],
        **extra,
    }


def _publish(staging: Path, root: Path, version_id: str, manifest: dict) -> Path:
    atomic_write_text(staging / MANIFEST_NAME, canonical_json(manifest))
    atomic_write_text(staging / CARD_NAME, dataset_card(manifest))
    return publish_version(staging, root, version_id)


def _plan_step(config: UltraCleanConfig, parent: DatasetVersion, step: str, step_config: dict,
               output_root: Path | None) -> tuple[Path, str, dict | None]:
    """A derived version's root and id (parent + step settings + code), and its manifest if already published."""
    root = Path(output_root or config.output.root).resolve()
    version_id = compute_version_id(inputs=[{"version_id": parent.version_id}], config={step: step_config},
                                    code=code_version(), parent=parent.version_id)
    manifest = root / version_id / MANIFEST_NAME
    return root, version_id, json.loads(manifest.read_text()) if manifest.is_file() else None


def _new_staging(root: Path, version_id: str) -> Path:
    staging = root / ".work" / f"{version_id}-{uuid.uuid4().hex[:8]}"
    (staging / SHARD_DIR).mkdir(parents=True)
    return staging


class ShardWriter:
    """Rows in arrival order into ``shard-NNNNN.parquet`` files of ``rows_per_shard`` rows each."""

    def __init__(self, directory: Path, schema: pa.Schema, config: UltraCleanConfig):
        self.directory, self.schema, self.config = directory, schema, config
        self.paths: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def _open(self) -> None:
        path = self.directory / f"shard-{len(self.paths):05d}.parquet"
        self.paths.append(path)
        self._writer = pq.ParquetWriter(path, self.schema, **self.config.output.parquet_options())
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
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def score_version(
    config: UltraCleanConfig, parent_path: Path, classifier_path: Path, output_root: Path | None = None
) -> StepResult:
    """Score every document of a dataset version into a new version with ``score`` and probability columns."""
    started = time.perf_counter()
    scoring = config.scoring
    parent = DatasetVersion.open(parent_path)
    expected = config.classifier.labels if config.classifier else None
    classifier = QualityClassifier.load(classifier_path, expected_labels=expected)  # fail here, not in an actor
    parent_schema = pq.read_schema(parent.shard_paths[0]) if parent.shard_paths else None
    if parent_schema is not None and scoring.text_column not in parent_schema.names:
        raise ValueError(f"scoring.text_column: {parent.path} has no {scoring.text_column!r} column ({parent_schema.names})")
    step_config = {**scoring.model_dump(mode="json", exclude={"classifier", "input", "workers", "batch_size"}),
                   "classifier_id": classifier.classifier_id}
    root, version_id, manifest = _plan_step(config, parent, "score", step_config, output_root)
    if manifest is not None:
        return StepResult(root / version_id, manifest, reused=True, seconds=time.perf_counter() - started)

    staging = _new_staging(root, version_id)
    schema = score_schema(parent_schema, classifier.labels) if parent_schema is not None else pa.schema([])
    writer = ShardWriter(staging / SHARD_DIR, schema, config)
    empty = truncated = 0
    max_chars = classifier.normalizer.config.max_chars
    try:
        if parent.manifest["totals"]["rows"]:
            ensure_ray(config.ray.address, config.ray.num_cpus)
            for batch in tqdm(_scored_batches(parent, classifier, config), desc="score: batches", unit="batch"):
                writer.write(batch)
                empty += batch.column(SCORE_COLUMN).null_count
                lengths = pc.utf8_length(batch.column(scoring.text_column))
                truncated += pc.sum(pc.cast(pc.greater(lengths, max_chars), pa.int64())).as_py() or 0
        writer.close()
        shards = [describe_shard(p, config.output.tokenizer, scoring.text_column) for p in writer.paths]
        extra = {
            "classifier": {"classifier_id": classifier.classifier_id, "path": str(classifier.path),
                           "labels": classifier.labels, "metrics": classifier.metadata.get("metrics")},
            "scoring": {"scored": sum(s["rows"] for s in shards) - empty, "empty": empty, "truncated": truncated},
        }
        manifest = derived_manifest(version_id=version_id, config=config, parent=parent, step="score",
                                    step_config=step_config, schema=schema, shards=shards, dropped=Counter(),
                                    extra=extra)
        final = _publish(staging, root, version_id, manifest)
    except BaseException:
        writer.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
    dataset = ray.data.read_parquet([str(p) for p in parent.shard_paths], num_cpus=0)
    dataset = dataset.map_batches(
        ScoreBatch,
        fn_constructor_kwargs={"classifier_path": str(classifier.path), "text_column": scoring.text_column},
        batch_size=scoring.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    yield from dataset.iter_batches(batch_format="pyarrow", batch_size=None)


@ray.remote
def select_shard(shard_path: str, out_path: str, cutoff_by_language: dict, language_column: str,
                 config_data: dict) -> dict:
    """One scored shard filtered by the cutoffs; written atomically (skipped when nothing is kept)."""
    config = UltraCleanConfig.model_validate(config_data)
    table = pq.read_table(shard_path)
    kept, dropped = select_table(table, cutoff_by_language, language_column)
    by_language = {}
    if language_column in table.column_names:
        before = Counter(language_values(table, language_column).tolist())
        after = Counter(language_values(kept, language_column).tolist())
        by_language = {lang: {"in": before[lang], "kept": after[lang]} for lang in sorted(before)}
    shard = None
    if len(kept):
        out = Path(out_path)
        tmp = out.with_name(f".{out.name}.tmp")
        pq.write_table(kept, tmp, row_group_size=config.output.row_group_rows, **config.output.parquet_options())
        tmp.replace(out)
        shard = describe_shard(out, config.output.tokenizer, config.scoring.text_column)
    return {"shard": shard, "dropped": dict(dropped), "by_language": by_language}


def select_version(config: UltraCleanConfig, parent_path: Path, output_root: Path | None = None) -> StepResult:
    """Keep the documents of a scored version that pass the selection; the rest are counted in the manifest."""
    started = time.perf_counter()
    select = config.select
    parent = DatasetVersion.open(parent_path)
    if SCORE_COLUMN not in parent.manifest["schema"]:
        raise ValueError(f"{parent.path} has no {SCORE_COLUMN!r} column: run the score step on it first")
    if select.by_language and select.language_column not in parent.manifest["schema"]:
        raise ValueError(f"select.language_column: {parent.path} has no {select.language_column!r} column")
    columns = [SCORE_COLUMN] + ([select.language_column] if select.by_language else [])
    table = pa.concat_tables([pq.read_table(p, columns=columns) for p in parent.shard_paths]) if parent.shard_paths \
        else pa.table({c: pa.array([], pa.float32()) for c in columns})
    scored = table.filter(pc.is_valid(table.column(SCORE_COLUMN)))
    scores = scored.column(SCORE_COLUMN).to_numpy().astype(np.float64)
    languages = language_values(scored, select.language_column) if select.by_language else None
    cutoff_by_language = cutoffs(select, scores, languages)
    step_config = select.model_dump(mode="json", exclude={"input"})
    root, version_id, manifest = _plan_step(config, parent, "select", step_config, output_root)
    if manifest is not None:
        return StepResult(root / version_id, manifest, reused=True, seconds=time.perf_counter() - started)

    staging = _new_staging(root, version_id)
    try:
        ensure_ray(config.ray.address, config.ray.num_cpus)
        config_data = config.model_dump(mode="json")
        task = select_shard.options(num_cpus=1, max_retries=config.ray.max_retries)
        refs = [task.remote(str(p), str(staging / SHARD_DIR / p.name), cutoff_by_language, select.language_column,
                            config_data) for p in parent.shard_paths]
        results = gather(refs, "select: shards")
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise RuntimeError(f"selecting shards failed: {failed[0]}")
        dropped: Counter = Counter()
        by_language: dict[str, Counter] = {}
        for result in results:
            dropped.update(result["dropped"])
            for lang, counts in result["by_language"].items():
                by_language.setdefault(lang, Counter()).update(counts)
        shards = [r["shard"] for r in results if r["shard"] is not None]
        schema = pq.read_schema(parent.shard_paths[0]) if parent.shard_paths else pa.schema([])
        extra = {"selection": {
            "mode": select.mode,
            "cutoffs": {lang: (None if np.isinf(v) else v) for lang, v in cutoff_by_language.items()},
            "by_language": {lang: dict(c) for lang, c in sorted(by_language.items())},
        }}
        manifest = derived_manifest(version_id=version_id, config=config, parent=parent, step="select",
                                    step_config=step_config, schema=schema, shards=shards, dropped=dropped,
                                    extra=extra)
        final = _publish(staging, root, version_id, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StepResult(final, manifest, reused=False, seconds=time.perf_counter() - started)
