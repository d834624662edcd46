"""The select step: a scored version -> a selected version (the documents at or above their language's cutoff).

Selection computes a cutoff per language from the score column alone, then filters each scored shard in its own
Ray task. The new version's manifest accounts for every parent row (kept, or dropped: ``no_score``,
``below_cutoff``).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from core.io import atomic_path
from core.manifest import describe_shard
from core.runtime import ensure_ray, gather
from core.versions import SHARD_DIR, DatasetVersion
from pipelines.config import UltraCleanConfig
from pipelines.derived import DerivedVersion, StepResult
from stages.scoring import SCORE_COLUMN
from stages.select import cutoffs, language_values, select_table

SELECT_CODE = ("stages.select", "pipelines.selection")


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
        with atomic_path(out_path) as tmp:
            pq.write_table(kept, tmp, row_group_size=config.output.row_group_rows, **config.output.parquet_options())
        shard = describe_shard(Path(out_path), config.output.tokenizer, config.scoring.text_column)
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
    derived = DerivedVersion.plan(config, parent, "select", step_config, SELECT_CODE, output_root)
    with derived.writing() as staging:
        if staging is None:
            return derived.reused(started)
        ensure_ray(config.ray.address, config.ray.num_cpus)
        config_data = config.model_dump(mode="json")
        task = select_shard.options(num_cpus=1, max_retries=config.ray.max_retries)
        refs = [task.remote(str(p), str(staging / SHARD_DIR / p.name), cutoff_by_language, select.language_column,
                            config_data) for p in parent.shard_paths]
        results = gather(refs, "select: shards", labels=[p.name for p in parent.shard_paths])
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
        final, manifest = derived.publish(staging, config, schema, shards, dropped, extra)
    return StepResult(final, manifest, reused=False, seconds=time.perf_counter() - started)
