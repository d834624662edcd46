"""Exact and MinHash near-duplicate removal across a whole run, with no process holding the whole run.

Everything is a map-reduce over hash partitions, one Ray task per part or per partition, files in between:

1. exact: each part maps (content_hash, order) to partitions by hash; each partition groups equal hashes and keeps
   the earliest; the others are written as removed, split by the part they come from (``part=<i>/``).
2. bands: each part maps (band, key, order), exact duplicates left out, to partitions by band key; each partition
   groups equal (band, key) and writes an edge from every later document to the group's earliest, both directions,
   split by the partition of the edge's source.
3. components: min-label propagation (``stages.dedup``), one task per partition and round: it takes the smallest
   label offered to each of its nodes, then offers its labels along its edges to the partitions of their ends.
   Rounds end when no label changes; a node whose label is not itself is a near duplicate.

The driver holds file paths and counts only; a task holds one part or one partition, so memory per process stays
flat as the run grows (more partitions, not bigger ones). Every task reports its peak resident memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import ray

from core.io import atomic_path
from core.runtime import gather, peak_rss_mb, reset_peak_rss
from core.storage import AnyPath, location, parquet_rows, read_parquet
from stages.dedup import (
    EDGES_SCHEMA,
    LABELS_SCHEMA,
    DedupConfig,
    duplicate_edges,
    offer_labels,
    partition_of,
    take_smallest,
    undirected,
)

ORDER_BITS = 40  # order = input index << 40 | record number: run order survives any scheduling
_BAND_SALT = np.uint64(0x632BE59BD9B4E019)  # keys of different bands must not meet in one group


@dataclass(frozen=True)
class DedupResult:
    exact: int  # documents removed as exact duplicates
    near: int  # documents removed as near duplicates (exact ones not counted again)
    removed: list[str]  # directories of removed orders, split by part: <dir>/part=<i>/*.parquet
    partitions: int
    rounds: int  # label propagation rounds
    peak_rss: dict[str, int]  # per phase, the largest peak resident memory (bytes) of any of its tasks


def peak_rss() -> int:
    """This process's peak resident memory in bytes since the last ``reset_peak_rss`` (0 where /proc does not say)."""
    return (peak_rss_mb() or 0) << 20


def _write(frame: pl.DataFrame, path: AnyPath) -> None:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def _read(directory: AnyPath, schema: dict) -> pl.DataFrame:
    files = sorted(directory.glob("*.parquet"), key=str) if directory.is_dir() else []
    return pl.concat([pl.from_arrow(read_parquet(f)) for f in files]) if files else pl.DataFrame(schema=schema)


def _split_by(frame: pl.DataFrame, column: str, directory: AnyPath, basename: str, values: np.ndarray) -> None:
    """Write ``frame``'s rows to ``directory/<column>=<value>/<basename>.parquet``, one file per value present."""
    if frame.is_empty():
        return
    keyed = frame.with_columns(pl.Series("_key", values))
    for (value,), group in keyed.partition_by("_key", as_dict=True).items():
        _write(group.drop("_key"), directory / f"{column}={value}" / f"{basename}.parquet")


def _split_by_part(orders: pl.DataFrame, directory: AnyPath, basename: str) -> None:
    _split_by(orders, "part", directory, basename, (orders["order"].to_numpy() >> ORDER_BITS))


def removed_count(removed: list[str], part: int) -> int:
    """How many orders of one part deduplication removed, from the files' metadata."""
    return sum(parquet_rows(f) for d in removed for f in (location(d) / f"part={part}").glob("*.parquet"))


def removed_orders(removed: list[str], part: int) -> np.ndarray:
    """The orders of one part that deduplication removed (sorted)."""
    frames = [_read(location(d) / f"part={part}", {"order": pl.Int64}) for d in removed]
    return np.sort(pl.concat(frames)["order"].to_numpy()) if frames else np.empty(0, np.int64)


# --- 1. exact ---------------------------------------------------------------------------------------------------


def exact_map(part: int, part_path: str, partitions: int, out: str) -> int:
    reset_peak_rss()
    frame = pl.from_arrow(read_parquet(part_path, columns=["order", "content_hash"]))
    _split_by(frame, "p", location(out), f"part-{part:05d}", partition_of(frame["content_hash"].to_numpy(), partitions))
    return peak_rss()


def exact_reduce(partition: int, keys: str, removed: str) -> tuple[int, int]:
    reset_peak_rss()
    frame = _read(location(keys) / f"p={partition}", {"order": pl.Int64, "content_hash": pl.UInt64})
    duplicates = duplicate_edges(frame, ["content_hash"]).select("order")
    _split_by_part(duplicates, location(removed), f"p{partition:05d}")
    return duplicates.height, peak_rss()


# --- 2. bands ---------------------------------------------------------------------------------------------------


def band_map(part: int, part_path: str, exact_removed: str, partitions: int, out: str) -> int:
    reset_peak_rss()
    frame = pl.from_arrow(read_parquet(part_path, columns=["order", "minhash_bands"]))
    frame = frame.filter(~pl.col("order").is_in(removed_orders([exact_removed], part)))
    if not frame.is_empty():
        bands = frame.explode("minhash_bands").with_columns(
            (pl.int_range(pl.len()).over("order")).cast(pl.UInt8).alias("band")
        ).rename({"minhash_bands": "key"})
        salted = bands["key"].to_numpy() ^ (bands["band"].to_numpy().astype(np.uint64) * _BAND_SALT)
        _split_by(bands, "p", location(out), f"part-{part:05d}", partition_of(salted, partitions))
    return peak_rss()


def band_reduce(partition: int, keys: str, partitions: int, edges: str) -> int:
    reset_peak_rss()
    frame = _read(location(keys) / f"p={partition}", {"order": pl.Int64, "key": pl.UInt64, "band": pl.UInt8})
    graph = undirected(duplicate_edges(frame, ["band", "key"]))
    _split_by(graph, "q", location(edges), f"from-p{partition:05d}", partition_of(graph["src"].to_numpy(), partitions))
    return peak_rss()


# --- 3. components --------------------------------------------------------------------------------------------


def propagate(partition: int, edges: str, labels_in: str | None, offers_in: str | None, labels_out: str,
              offers_out: str, partitions: int) -> tuple[int, int]:
    """One round for one partition: take the smallest offered labels, then offer them along the edges."""
    reset_peak_rss()
    graph = _read(location(edges) / f"q={partition}", EDGES_SCHEMA)
    if labels_in is None:  # the first round: every node is its own label
        labels = graph.select(pl.col("src").alias("node"), pl.col("src").alias("label")).unique()
        changed = labels.height
    else:
        labels = _read(location(labels_in) / f"q={partition}", LABELS_SCHEMA)
        labels, changed = take_smallest(labels, _read(location(offers_in) / f"q={partition}", LABELS_SCHEMA))
    _write(labels, location(labels_out) / f"q={partition}" / "labels.parquet")
    offers = offer_labels(graph, labels)
    _split_by(offers, "q", location(offers_out), f"from-q{partition:05d}", partition_of(offers["node"].to_numpy(),
                                                                                    partitions))
    return changed, peak_rss()


def near_reduce(partition: int, labels: str, removed: str) -> tuple[int, int]:
    reset_peak_rss()
    frame = _read(location(labels) / f"q={partition}", LABELS_SCHEMA)
    duplicates = frame.filter(pl.col("node") != pl.col("label")).select(pl.col("node").alias("order"))
    _split_by_part(duplicates, location(removed), f"q{partition:05d}")
    return duplicates.height, peak_rss()


def partitions_for(rows: int, config: DedupConfig) -> int:
    """Enough partitions that none holds much more than ``rows_per_partition`` band entries."""
    return max(1, math.ceil(rows * config.minhash.num_bands / config.rows_per_partition))


def deduplicate(parts: list[tuple[int, str]], rows: int, config: DedupConfig, work: AnyPath,
                task_options: dict, fresh_workers: bool = False) -> DedupResult:
    """Exact, then near duplicates of the parts (``(part index, path)``, holding ``rows`` documents in all).

    ``task_options`` are Ray's options of every task (CPUs, retries, resources, placement). ``fresh_workers`` runs every task in a new worker process, so each peak memory is the task's own (a reused
    worker keeps what earlier tasks' allocators retained); it costs a process start per task.
    """
    partitions = partitions_for(rows, config)
    options = {**task_options, "max_calls": 1 if fresh_workers else 0}
    exact_map_task, exact_reduce_task, band_map_task, band_reduce_task, propagate_task, near_reduce_task = (
        ray.remote(**options)(fn) for fn in (exact_map, exact_reduce, band_map, band_reduce, propagate, near_reduce))
    peaks: dict[str, int] = {}
    exact = 0
    removed = []
    if config.exact:
        keys, exact_removed = work / "exact-keys", work / "exact-removed"
        peaks["exact map"] = max(gather([exact_map_task.remote(i, path, partitions, str(keys))
                                         for i, path in parts], "dedup: exact (map)", labels=[p for _, p in parts]))
        counts = gather([exact_reduce_task.remote(p, str(keys), str(exact_removed))
                         for p in range(partitions)], "dedup: exact (reduce)")
        exact, peaks["exact reduce"] = sum(c for c, _ in counts), max(peak for _, peak in counts)
        removed.append(str(exact_removed))
    near, rounds = 0, 0
    if config.minhash.enabled:
        keys, edges = work / "band-keys", work / "edges"
        exact_dir = str(work / "exact-removed")
        peaks["band map"] = max(gather([band_map_task.remote(i, path, exact_dir, partitions, str(keys))
                                        for i, path in parts], "dedup: bands (map)", labels=[p for _, p in parts]))
        peaks["band reduce"] = max(gather([band_reduce_task.remote(p, str(keys), partitions, str(edges))
                                           for p in range(partitions)], "dedup: bands (reduce)"))
        labels, offers, changed = None, None, 1
        while changed:
            rounds += 1
            labels_out, offers_out = work / f"labels-{rounds}", work / f"offers-{rounds}"
            results = gather([propagate_task.remote(
                q, str(edges), labels, offers, str(labels_out), str(offers_out), partitions)
                for q in range(partitions)], f"dedup: components (round {rounds})")
            changed = sum(c for c, _ in results) if rounds > 1 else 1
            peaks["components"] = max([peaks.get("components", 0)] + [peak for _, peak in results])
            labels, offers = str(labels_out), str(offers_out)
        near_removed = work / "near-removed"
        counts = gather([near_reduce_task.remote(q, labels, str(near_removed))
                         for q in range(partitions)], "dedup: near duplicates")
        near, peaks["near reduce"] = sum(c for c, _ in counts), max(peak for _, peak in counts)
        removed.append(str(near_removed))
    return DedupResult(exact, near, removed, partitions, rounds, peaks)

