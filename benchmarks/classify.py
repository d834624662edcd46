"""Throughput of the UltraClean scoring stage against a plain fastText loop in the same process.

    python benchmarks/classify.py                       # CPU: 60,000 real CC documents (697 repeated), small model
    python benchmarks/classify.py --docs 200000 --dim 256 --bucket 2000000 --workers 1 2 4 8

Baseline: ``model.predict(normalise(text))`` one document at a time, the least any correct scorer must do
(scores are only valid on text normalised as in training). Also printed: predict on raw text (no normaliser),
for scale. The stage is ``pipelines.score.score_version`` end to end: Ray Data read, ``ScoreBatch`` actors,
the ordered shard writer, the manifest. Figures are documents/s per scoring worker and ratios to the baseline.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"


def _documents(count: int) -> list[str]:
    with gzip.open(DATA / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return [texts[i % len(texts)] for i in range(count)]  # the real documents, repeated to the size asked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=60_000, help="enough that start-up costs amortise as in a real run")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bucket", type=int, default=200_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from core.manifest import publish_table
    from core.runtime import ensure_ray
    from pipelines.config import parse_config
    from pipelines.score import score_version
    from stages.classifier import ClassifierConfig, QualityClassifier, train_classifier

    ensure_ray(num_cpus=max(args.workers))
    work = Path(tempfile.mkdtemp(prefix="classify-bench-"))
    docs = _documents(args.docs)
    parent = publish_table(pa.table({"content": docs}), work / "data", name="bench")
    classifier_config = ClassifierConfig.model_validate({
        "seeds": {"positive": {"sources": [{"path": str(DATA / "text/wikitext-2/valid.txt"), "split": "line",
                                            "min_chars": 200}]},
                  "negative": {"sources": [{"path": str(DATA / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz"),
                                            "text_key": "text"}]}},
        "fasttext": {"dim": args.dim, "bucket": args.bucket, "epoch": 3, "lr": 0.1},
    })
    classifier_path = train_classifier(classifier_config, work, work / "classifiers").path

    classifier = QualityClassifier.load(classifier_path)
    normalise, model = classifier.normalizer, classifier.model
    started = time.perf_counter()
    for text in docs:
        model.predict(normalise(text), k=2)
    loop_rate = len(docs) / (time.perf_counter() - started)
    started = time.perf_counter()
    for text in docs:
        model.predict(" ".join(text.split()), k=2)
    raw_rate = len(docs) / (time.perf_counter() - started)
    print(f"{len(docs)} documents ({sum(map(len, docs)) / len(docs):.0f} chars avg), model dim {args.dim}")
    print(f"baseline  plain loop, normalise + predict : {loop_rate:9.0f} docs/s (1 core)")
    print(f"          plain loop, predict on raw text : {raw_rate:9.0f} docs/s ({raw_rate / loop_rate:.2f}x baseline)")

    per_worker = {}
    for workers in args.workers:
        config = parse_config({"name": f"bench-{workers}", "steps": ["score"], "output": {"rows_per_shard": 100_000},
                               "scoring": {"workers": workers, "batch_size": 1024}})
        score_version(config, parent, classifier_path, work / f"warm-{workers}")  # actor start-up and imports
        started = time.perf_counter()
        result = score_version(config, parent, classifier_path, work / f"out-{workers}")
        seconds = time.perf_counter() - started
        rate = len(docs) / seconds
        per_worker[workers] = rate / workers
        print(f"stage     {workers} worker(s)                     : {rate:9.0f} docs/s, {rate / workers:9.0f} "
              f"per worker = {rate / workers / loop_rate:.2f}x baseline (overhead "
              f"{100 * (1 - rate / workers / loop_rate):+.0f}%); {result.manifest['totals']['rows']} rows")
    if len(per_worker) > 1:
        first, last = min(per_worker), max(per_worker)
        speedup = per_worker[last] * last / (per_worker[first] * first)
        print(f"scaling   {first} -> {last} workers: {speedup:.2f}x throughput ({speedup / (last / first):.0%} efficiency)")


if __name__ == "__main__":
    main()
