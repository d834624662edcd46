"""Near-duplicate clustering at scale: time and memory of the partitioned dedup on synthetic MinHash signatures.

    python benchmarks/dedup.py                         # 1 M and 4 M signatures (CPU: about 10 minutes on 2 cores)
    python benchmarks/dedup.py --sizes 1000000 --rows-per-partition 2000000

The signatures have a known duplicate structure: 2% of the documents are exact copies of another document; 10% are
members of near-duplicate groups of 2-6 documents chained through different bands (each member shares one band key
with the member before it), so finding a whole group needs the components pass, not one band's buckets. Every other
key is random. Printed per size: documents removed as exact and as near duplicates (planted vs found), wall time,
the growth of the driver's peak resident memory during the run, and the largest peak of any task (measured in a
second run with a fresh worker process per task, so each peak is the task's own). Both stay flat as the input
grows: more partitions, not bigger ones.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

BANDS = 14
PART_ROWS = 100_000


def synthesize(total: int, directory: Path, seed: int = 0) -> tuple[list[tuple[int, str]], int, int]:
    """Parts of PART_ROWS signatures; returns the parts and the planted exact and near duplicate counts."""
    from pipelines.dedup import ORDER_BITS

    rng = np.random.default_rng(seed)
    hashes = rng.integers(1 << 62, size=total, dtype=np.uint64)
    bands = rng.integers(1 << 62, size=(total, BANDS), dtype=np.uint64)
    roles = rng.permutation(total)
    exact_copies, grouped = roles[: total // 50], roles[total // 50 : total // 50 + total // 10]
    sources = roles[total // 50 + total // 10 :][: len(exact_copies)]
    hashes[exact_copies], bands[exact_copies] = hashes[sources], bands[sources]
    near = 0
    start = 0
    while start < len(grouped):
        size = int(rng.integers(2, 7))
        group = np.sort(grouped[start : start + size])
        for previous, member in itertools.pairwise(group):
            band = int(rng.integers(BANDS))
            bands[member, band] = bands[previous, band]
        near += len(group) - 1
        start += size
    parts = []
    for part, first in enumerate(range(0, total, PART_ROWS)):
        rows = slice(first, min(first + PART_ROWS, total))
        orders = (np.int64(part) << ORDER_BITS) + np.arange(rows.stop - rows.start, dtype=np.int64)
        path = directory / f"part-{part:05d}.parquet"
        pl.DataFrame({"order": orders, "content_hash": hashes[rows],
                      "minhash_bands": pl.Series(bands[rows].tolist(), dtype=pl.List(pl.UInt64))}).write_parquet(path)
        parts.append((part, str(path)))
    return parts, len(exact_copies), near


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--rows-per-partition", type=int, default=3_500_000, help="band entries per partition")
    parser.add_argument("--cpus", type=int, default=None)
    args = parser.parse_args()

    from core.runtime import ensure_ray
    from pipelines.dedup import deduplicate, peak_rss, reset_peak_rss
    from stages.dedup import DedupConfig

    ensure_ray(num_cpus=args.cpus)
    config = DedupConfig.model_validate({"minhash": {"num_bands": BANDS}, "rows_per_partition": args.rows_per_partition})
    print(f"{'signatures':>11} {'exact planted/found':>20} {'near planted/found':>19} {'parts':>6} {'partitions':>10} "
          f"{'rounds':>6} {'wall s':>7} {'us/doc':>7} {'driver peak MB':>14} {'largest task MB':>15}")
    for total in args.sizes:
        with tempfile.TemporaryDirectory(prefix="dedup-bench-") as scratch:
            work = Path(scratch)
            parts, exact, near = synthesize(total, work)
            reset_peak_rss()
            driver_before = peak_rss()
            started = time.perf_counter()
            result = deduplicate(parts, total, config, work / "dedup", task_options={"num_cpus": 1, "max_retries": 0})
            seconds = time.perf_counter() - started
            driver = peak_rss() - driver_before
            # again, every task in a fresh worker: a reused worker's peak includes what earlier tasks left behind
            measured = deduplicate(parts, total, config, work / "measured", task_options={"num_cpus": 1, "max_retries": 0}, fresh_workers=True)
        print(f"{total:>11,} {exact:>9,} / {result.exact:<9,} {near:>8,} / {result.near:<8,} {len(parts):>6} "
              f"{result.partitions:>10} {result.rounds:>6} {seconds:>7.1f} {1e6 * seconds / total:>7.1f} "
              f"{driver / 2**20:>14.0f} {max(measured.peak_rss.values()) / 2**20:>15.0f}")
        print("             task peak MB per phase: " + ", ".join(f"{phase} {rss / 2**20:.0f}"
                                                                for phase, rss in measured.peak_rss.items()))


if __name__ == "__main__":
    main()
