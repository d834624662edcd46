"""Exact and MinHash near-duplicate removal across the whole run.

Per document (inside each input's task) we compute a content hash and MinHash band keys. Across the run, documents
are grouped by content hash and by each band key; every group keeps its first document in run order (input file
order, then record order), so the result does not depend on scheduling. Near-duplicate groups of different bands
are joined into components by min-label propagation, which runs on hash partitions (``pipelines/dedup.py``).
"""

from __future__ import annotations

import unicodedata
from itertools import islice

import numpy as np
import polars as pl
import regex
import xxhash
from pydantic import Field, NonNegativeInt, PositiveInt

from core.config import Strict

_MERSENNE_PRIME = np.uint64((1 << 61) - 1)
_MAX_HASH = np.uint64((1 << 32) - 1)
_PUNCTUATION = regex.compile(r"[\p{P}\p{S}]+")
_UNSEGMENTED_SCRIPTS = {"zh", "ja", "ko", "th", "lo", "my", "km", "bo", "wuu", "yue"}


class MinHashConfig(Strict):
    enabled: bool = True
    num_bands: PositiveInt = 14
    rows_per_band: PositiveInt = 8
    ngram: PositiveInt = 5
    seed: NonNegativeInt = 1


class DedupConfig(Strict):
    exact: bool = True
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    rows_per_partition: PositiveInt = Field(
        4_000_000, description="band entries per dedup partition: memory per task, not per run, is what it bounds"
    )


def normalize_for_dedup(text: str) -> str:
    """Lower-case, NFKC, punctuation and symbols removed, whitespace collapsed: formatting noise is not novelty."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def content_hash(text: str) -> int:
    return xxhash.xxh64_intdigest(normalize_for_dedup(text).encode())


class MinHasher:
    """MinHash over word n-grams (character n-grams for scripts written without spaces)."""

    def __init__(self, config: MinHashConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        num_perm = config.num_bands * config.rows_per_band
        # 32-bit shingle hashes times 32-bit coefficients cannot overflow uint64 before the modulo
        self.a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)

    def shingles(self, text: str, language: str) -> set[str]:
        return self.normalized_shingles(normalize_for_dedup(text), language)

    def normalized_shingles(self, normalized: str, language: str) -> set[str]:
        units = list(normalized.replace(" ", "")) if language in _UNSEGMENTED_SCRIPTS else normalized.split()
        n = self.config.ngram
        if len(units) <= n:
            return {" ".join(units)}
        return set(map(" ".join, zip(*(islice(units, start, None) for start in range(n)))))

    def band_keys(self, text: str, language: str) -> list[int]:
        return self.normalized_band_keys(normalize_for_dedup(text), language)

    def normalized_band_keys(self, normalized: str, language: str) -> list[int]:
        shingles = self.normalized_shingles(normalized, language)
        hashes = np.fromiter(map(xxhash.xxh32_intdigest, map(str.encode, shingles)), dtype=np.uint64, count=len(shingles))
        # (a x + b) mod p alone is monotone in x for small x, so the shingle with the smallest hash would be the
        # minimum under every permutation and the rows of a band would agree far more often than Jaccard says;
        # keeping the low 32 bits breaks that order (as datasketch and datatrove do)
        permuted = hashes[:, None] * self.a[None, :] + self.b[None, :]
        # mod 2**61 - 1 without a division: fold the bits above 61 onto the low ones, subtract p once if needed
        permuted = (permuted & _MERSENNE_PRIME) + (permuted >> np.uint64(61))
        permuted = np.where(permuted >= _MERSENNE_PRIME, permuted - _MERSENNE_PRIME, permuted) & _MAX_HASH
        signature = permuted.min(axis=0).reshape(self.config.num_bands, self.config.rows_per_band)
        return [xxhash.xxh64_intdigest(band.tobytes()) for band in signature]


def dedup_keys(text: str, language: str, hasher: MinHasher | None) -> tuple[int, list[int]]:
    """The exact hash and the MinHash band keys (none without a hasher), from one normalization of the text."""
    normalized = normalize_for_dedup(text)
    exact = xxhash.xxh64_intdigest(normalized.encode())
    return exact, hasher.normalized_band_keys(normalized, language) if hasher is not None else []


def duplicate_edges(frame: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """(``order``, ``first``) for every document that is not the first (lowest order) of its group of equal keys."""
    with_first = frame.select("order", pl.col("order").min().over(keys).alias("first"))
    return with_first.filter(pl.col("order") != pl.col("first"))


# Connected components by min-label propagation: every document starts labelled with itself, and each round every
# edge offers its source's label to its destination, which keeps the smallest it has seen. When no label changes,
# each document's label is the earliest document of its component, the one the component keeps (the same answer as
# union-find with the earliest document as root). A round is a join and a group-by over edges and labels, so it runs
# on hash partitions of them without any process holding the whole graph (pipelines/dedup.py); ``components`` is
# the same loop on one partition, for data that fits in memory.

EDGES_SCHEMA = {"src": pl.Int64, "dst": pl.Int64}
LABELS_SCHEMA = {"node": pl.Int64, "label": pl.Int64}


def undirected(edges: pl.DataFrame) -> pl.DataFrame:
    """Duplicate edges (order, first) in both directions, as (src, dst), without repeats."""
    forward = edges.select(pl.col("order").alias("src"), pl.col("first").alias("dst"))
    backward = edges.select(pl.col("first").alias("src"), pl.col("order").alias("dst"))
    return pl.concat([forward, backward]).unique()


def offer_labels(edges: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Each edge's destination, with the label its source has now: (node, label) offers."""
    return edges.join(labels, left_on="src", right_on="node").select(pl.col("dst").alias("node"), "label")


def take_smallest(labels: pl.DataFrame, offers: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Every node's smallest label among its own and the offers; and how many labels went down."""
    merged = pl.concat([labels, offers]).group_by("node").agg(pl.col("label").min())
    changed = merged.join(labels, on="node", how="left", suffix="_before").filter(
        pl.col("label_before").is_null() | (pl.col("label") < pl.col("label_before"))
    ).height
    return merged, changed


def components(edges: pl.DataFrame) -> pl.DataFrame:
    """(node, label) for every node of the duplicate edges (order, first): label = its component's earliest."""
    graph = undirected(edges)
    labels = graph.select(pl.col("src").alias("node"), pl.col("src").alias("label")).unique()
    changed = 1
    while changed:
        labels, changed = take_smallest(labels, offer_labels(graph, labels))
    return labels


def near_duplicates(edges: pl.DataFrame) -> np.ndarray:
    """The orders of every document that is not the earliest of its near-duplicate component."""
    labels = components(edges).filter(pl.col("node") != pl.col("label"))
    return np.sort(labels["node"].to_numpy())


def partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    """A hash partition per value (Fibonacci hashing, so sequential ids and raw hashes spread alike)."""
    mixed = np.asarray(values).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(partitions)).astype(np.int64)
