"""The select step: a scored version -> a selected version (the documents at or above their language's cutoff).

Selection computes a cutoff per language from the score column alone, then filters each scored shard in its own
Ray task. The new version's manifest accounts for every parent row (kept, or dropped: ``no_score``,
``below_cutoff``).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from core.io import atomic_path
from core.manifest import describe_shard
from core.runtime import ensure_ray, gather
from core.storage import location, parquet_schema, read_parquet
from core.versions import SHARD_DIR, DatasetVersion
from pipelines.config import UltraCleanConfig
from pipelines.derived import DerivedVersion, StepResult
from stages.scoring import SCORE_COLUMN
from stages.select import cutoffs, language_values, select_table

SELECT_CODE = ("stages.select", "pipelines.selection")


@ray.remote
def select_shard(shard_path: str, version_dir: str, cutoff_by_language: dict, config_data: dict) -> dict:
    """One scored shard filtered by the cutoffs, into ``data/`` or, split by language, ``data/<language>/`` (each
    file written atomically, none when nothing is kept)."""
    config = UltraCleanConfig.model_validate(config_data)
    select, language_column = config.select, config.select.language_column
    table = read_parquet(shard_path)
    kept, dropped = select_table(table, cutoff_by_language, language_column)
    by_language, parts = {}, {"": kept}
    if language_column in table.column_names:
        before = Counter(language_values(table, language_column).tolist())
        after = Counter(language_values(kept, language_column).tolist())
        by_language = {lang: {"in": before[lang], "kept": after[lang]} for lang in sorted(before)}
        if select.split_by_language:
            languages = language_values(kept, language_column)
            parts = {lang or "unknown": kept.filter(pa.array(languages == lang)) for lang in sorted(set(languages))}
    shards = []
    for split, part in parts.items():
        if not len(part):
            continue
        out = location(version_dir) / SHARD_DIR / split / location(shard_path).name
        with atomic_path(out) as tmp:
            pq.write_table(part, tmp, row_group_size=config.output.row_group_rows, **config.output.parquet_options())
        shards.append(describe_shard(out, version_dir, config.output.tokenizer, config.scoring.text_column))
    return {"shards": shards, "dropped": dict(dropped), "by_language": by_language}


def select_version(config: UltraCleanConfig, parent_path: str | os.PathLike,
                   output_root: str | os.PathLike | None = None) -> StepResult:
    """Keep the documents of a scored version that pass the selection; the rest are counted in the manifest."""
    started = time.perf_counter()
    select = config.select
    parent = DatasetVersion.open(parent_path)
    if SCORE_COLUMN not in parent.manifest["schema"]:
        raise ValueError(f"{parent.path} has no {SCORE_COLUMN!r} column: run the score step on it first")
    if select.by_language and select.language_column not in parent.manifest["schema"]:
        raise ValueError(f"select.language_column: {parent.path} has no {select.language_column!r} column")
    columns = [SCORE_COLUMN] + ([select.language_column] if select.by_language else [])
    table = pa.concat_tables([read_parquet(p, columns=columns) for p in parent.shard_paths]) if parent.shard_paths \
        else pa.table({c: pa.array([], pa.float32()) for c in columns})
    scored = table.filter(pc.is_valid(table.column(SCORE_COLUMN)))
    scores = scored.column(SCORE_COLUMN).to_numpy().astype(np.float64)
    languages = language_values(scored, select.language_column) if select.by_language else None
    cutoff_by_language = cutoffs(select, scores, languages)
    step_config = select.model_dump(mode="json", exclude={"input"})
    derived = DerivedVersion.plan(config, parent, "select", step_config, SELECT_CODE, output_root)
    with derived.writing() as version_dir:
        if version_dir is None:
            return derived.reused(started)
        ensure_ray(config.ray.address, config.ray.num_cpus)
        config_data = config.model_dump(mode="json")
        task = select_shard.options(**config.ray.task_options())
        refs = [task.remote(str(p), str(version_dir), cutoff_by_language, config_data) for p in parent.shard_paths]
        results = gather(refs, "select: shards", labels=[p.name for p in parent.shard_paths])
        dropped: Counter = Counter()
        by_language: dict[str, Counter] = {}
        for result in results:
            dropped.update(result["dropped"])
            for lang, counts in result["by_language"].items():
                by_language.setdefault(lang, Counter()).update(counts)
        shards = sorted((shard for r in results for shard in r["shards"]), key=lambda shard: shard["path"])
        schema = parquet_schema(parent.shard_paths[0]) if parent.shard_paths else pa.schema([])
        splits = sorted({PurePosixPath(shard["path"]).parent.name for shard in shards} - {SHARD_DIR})
        extra = {"splits": splits, "selection": {
            "mode": select.mode,
            "cutoffs": {lang: (None if np.isinf(v) else v) for lang, v in cutoff_by_language.items()},
            "by_language": {lang: dict(c) for lang, c in sorted(by_language.items())},
        }}
        final, manifest = derived.publish(version_dir, config, schema, shards, dropped, extra)
    return StepResult(final, manifest, reused=False, seconds=time.perf_counter() - started)
