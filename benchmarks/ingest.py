"""Ingest throughput: our Ray pipeline vs the same steps as a plain datatrove pipeline, and 1 -> 2 Ray workers.

    python benchmarks/ingest.py [--copies 6] [--work-dir DIR]

Input: `--copies` JSONL.gz files, each the 697 real Common Crawl documents of ../shared/data/crawl (ids made
unique per copy). Both pipelines run reader -> fastText lid.176 -> Gopher repetition -> Gopher quality -> C4 ->
FineWeb -> Parquet with the same thresholds (configs/default.yaml); ours also computes MinHash signatures, finds
exact and near duplicates across the run and writes a versioned dataset with checksums, work the datatrove baseline
does not do. Figures are documents per second per core; the datatrove run is `LocalPipelineExecutor(tasks=1,
workers=1)` in this process. Both sides are timed after a warm-up that loads spaCy and fastText once.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

import fasttext
import ray
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import ParquetWriter
from datatrove.utils.lid import FT176LID

from pipelines.config import load_config, parse_config
from pipelines.ingest import run_ingest
from stages.langid import resolve_lid_model

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / ".." / "shared" / "data" / "crawl" / "CC-MAIN-2019-30-extracted.jsonl.gz"


def make_inputs(work: Path, copies: int) -> tuple[Path, int]:
    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    with gzip.open(SOURCE, "rt") as source:
        rows = [json.loads(line) for line in source]
    for copy in range(copies):
        with gzip.open(inputs / f"cc-{copy:02d}.jsonl.gz", "wt") as f:
            for row in rows:
                f.write(json.dumps({"id": f"{row['id']}-{copy}", "text": row["text"]}) + "\n")
    return inputs, copies * len(rows)


def our_config(inputs: Path, num_cpus: int):
    default, _ = load_config()
    data = default.model_dump(mode="json")
    data["inputs"] = [{"path": str(inputs / "*.jsonl.gz")}]
    data["ray"]["num_cpus"] = num_cpus
    return parse_config(data, "benchmark")


def run_ours(inputs: Path, out: Path, num_cpus: int) -> float:
    ray.shutdown()
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
    # warm the worker pool (imports, spaCy and fastText loads happen once per worker, as in any long run)
    run_ingest(our_config(inputs, num_cpus), REPO, out / "warmup")
    started = time.perf_counter()
    result = run_ingest(our_config(inputs, num_cpus), REPO, out / "timed")
    elapsed = time.perf_counter() - started
    assert not result.reused
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


class LocalLid176(FT176LID):
    """datatrove's lid.176 identifier, loading the model from the installed package instead of downloading it."""

    @property
    def model(self):
        if self._model is None:
            self._model = fasttext.load_model(str(resolve_lid_model(None)))
        return self._model


def run_datatrove(inputs: Path, out: Path) -> float:
    config, _ = load_config()
    params = {f.kind: f.params for f in config.filters}
    language = LanguageFilter(languages=config.langid.keep_languages, language_threshold=config.langid.min_score)
    language.model = LocalLid176(config.langid.keep_languages)
    pipeline = [
        JsonlReader(str(inputs), glob_pattern="*.jsonl.gz"),
        language,
        GopherRepetitionFilter(**params["gopher_repetition"]),
        GopherQualityFilter(**params["gopher_quality"]),
        C4QualityFilter(**params["c4"]),
        FineWebQualityFilter(**params["fineweb"]),
        ParquetWriter(str(out / "parquet")),
    ]
    # warm-up mirrors ours: one full pass first (spaCy's vocabulary and fastText load once per process)
    for attempt in ("warmup", "timed"):
        executor = LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1, logging_dir=str(out / f"logs-{attempt}"))
        started = time.perf_counter()
        executor.run()
        elapsed = time.perf_counter() - started
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=6, help="input files (each 697 documents)")
    parser.add_argument("--work-dir", help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-ingest-"))
    inputs, documents = make_inputs(work, args.copies)

    datatrove_s = run_datatrove(inputs, work / "datatrove")
    ours_1 = run_ours(inputs, work / "ours1", num_cpus=1)
    ours_2 = run_ours(inputs, work / "ours2", num_cpus=2)

    rate = {"datatrove (1 core)": documents / datatrove_s, "ours, 1 Ray worker": documents / ours_1,
            "ours, 2 Ray workers": documents / ours_2 / 2}
    print(f"\n{documents} documents in {args.copies} files")
    print(f"{'pipeline':<24}{'wall s':>9}{'docs/s/core':>13}")
    for (name, per_core), seconds in zip(rate.items(), [datatrove_s, ours_1, ours_2]):
        print(f"{name:<24}{seconds:>9.2f}{per_core:>13.1f}")
    print(f"ours / datatrove, single core:   {datatrove_s / ours_1:.2f}x  (target >= 0.9x)")
    print(f"speed-up 1 -> 2 Ray workers:     {ours_1 / ours_2:.2f}x  (target >= 1.7x)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
