"""Exact and MinHash near-duplicate removal across the whole run.

Per document (inside each input's task) we compute a content hash and MinHash band keys. Across the run, documents
are grouped by content hash and by each band key; every group keeps its first document in run order (input file
order, then record order), so the result does not depend on scheduling. Band grouping runs as one Ray task per band,
like datatrove's bucket stage; the clustering of candidate pairs (union-find) runs once on the driver, like
datatrove's cluster stage.
"""

from __future__ import annotations

import unicodedata

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
        normalized = normalize_for_dedup(text)
        units = list(normalized.replace(" ", "")) if language in _UNSEGMENTED_SCRIPTS else normalized.split()
        n = self.config.ngram
        if len(units) <= n:
            return {" ".join(units)}
        return {" ".join(units[i : i + n]) for i in range(len(units) - n + 1)}

    def band_keys(self, text: str, language: str) -> list[int]:
        hashes = np.fromiter((xxhash.xxh32_intdigest(s.encode()) for s in self.shingles(text, language)), dtype=np.uint64)
        # (a x + b) mod p alone is monotone in x for small x, so the shingle with the smallest hash would be the
        # minimum under every permutation and the rows of a band would agree far more often than Jaccard says;
        # keeping the low 32 bits breaks that order (as datasketch and datatrove do)
        permuted = ((hashes[:, None] * self.a[None, :] + self.b[None, :]) % _MERSENNE_PRIME) & _MAX_HASH
        signature = permuted.min(axis=0).reshape(self.config.num_bands, self.config.rows_per_band)
        return [xxhash.xxh64_intdigest(band.tobytes()) for band in signature]


def first_in_group(keys: pl.DataFrame, key: str) -> pl.DataFrame:
    """Rows (``order``, ``representative``) for every document that is not the first of its ``key`` group."""
    firsts = keys.group_by(key).agg(pl.col("order").min().alias("representative"))
    joined = keys.join(firsts, on=key)
    return joined.filter(pl.col("order") != pl.col("representative")).select("order", "representative")


def band_duplicate_pairs(band_frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Candidate pairs for one band: each document with a colliding band key, paired with the group's first."""
    frame = pl.concat(band_frames) if band_frames else pl.DataFrame(schema={"order": pl.Int64, "band": pl.UInt64})
    return first_in_group(frame, "band")


def cluster_duplicates(pairs: pl.DataFrame) -> np.ndarray:
    """Union-find over candidate pairs; returns the orders of every document that is not its cluster's first."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for order, representative in pairs.iter_rows():
        a, b = root(order), root(representative)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the earliest document roots the cluster
    return np.array(sorted(x for x in parent if root(x) != x), dtype=np.int64)
