"""MinHash LSH against exact Jaccard similarity: the duplicate rate follows the S-curve that bands x rows imply."""

from __future__ import annotations

import math

import numpy as np
import xxhash

from stages.dedup import MinHashConfig, MinHasher


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


def _pairs(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """Documents of 150 distinct-ish words and a copy with a random share of the words replaced, so the exact
    Jaccard similarity of their 5-gram sets spreads over the whole range."""
    vocabulary = [f"w{i}" for i in range(5000)]
    pairs = []
    for _ in range(count):
        words = list(rng.choice(vocabulary, size=150))
        copy = list(words)
        for position in rng.choice(150, size=int(rng.integers(0, 40)), replace=False):
            copy[position] = f"x{rng.integers(1_000_000)}"
        pairs.append((" ".join(words), " ".join(copy)))
    return pairs


def test_duplicate_rate_follows_the_banding_curve_around_its_threshold():
    config = MinHashConfig(num_bands=14, rows_per_band=8, ngram=5, seed=3)
    hasher = MinHasher(config)
    b, r = config.num_bands, config.rows_per_band
    threshold = (1 / b) ** (1 / r)  # where the S-curve is steepest: ~0.72 for 14 x 8
    similarity, collided = [], []
    for first, second in _pairs(np.random.default_rng(0), 700):
        similarity.append(_jaccard(hasher.shingles(first, "en"), hasher.shingles(second, "en")))
        collided.append(bool(set(hasher.band_keys(first, "en")) & set(hasher.band_keys(second, "en"))))
    similarity, collided = np.array(similarity), np.array(collided)
    predicted = 1 - (1 - similarity**r) ** b  # probability that at least one band of r rows agrees

    def observed_matches_predicted(mask: np.ndarray) -> bool:
        expected, variance = predicted[mask].sum(), (predicted[mask] * (1 - predicted[mask])).sum()
        return abs(collided[mask].sum() - expected) <= 4 * math.sqrt(variance) + 1

    near = np.abs(similarity - threshold) < 0.15
    assert near.sum() > 100, "the pairs must cover the threshold region"
    assert observed_matches_predicted(near)
    assert observed_matches_predicted(similarity < threshold - 0.15) and collided[similarity < 0.4].mean() < 0.05
    assert observed_matches_predicted(similarity > threshold + 0.15) and collided[similarity > 0.9].mean() > 0.95
    below, above = collided[near & (similarity < threshold)].mean(), collided[near & (similarity > threshold)].mean()
    assert below < 0.6 < above  # the rate crosses one half at the threshold bands x rows imply


# --- components across partitions against plain union-find --------------------------------------------------------


def _union_find_duplicates(rows: list[tuple[int, int, list[int]]]) -> tuple[set[int], set[int]]:
    """The reference, written apart from the code under test: exact duplicates by content hash (first kept), then
    union-find over documents sharing a band key, the earliest document of each cluster kept."""
    first_by_hash, exact = {}, set()
    for order, digest, _ in sorted(rows):
        if digest in first_by_hash:
            exact.add(order)
        else:
            first_by_hash[digest] = order
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    first_by_key: dict[tuple[int, int], int] = {}
    for order, _, bands in sorted(rows):
        if order in exact:
            continue
        for band, key in enumerate(bands):
            other = first_by_key.setdefault((band, key), order)
            a, b = root(order), root(other)
            parent[max(a, b)] = min(a, b)
    near = {x for x in parent if root(x) != x}
    return exact, near


def test_partitioned_components_find_the_same_clusters_as_union_find(ray_local, tmp_path):
    import polars as pl

    from pipelines.dedup import ORDER_BITS, deduplicate, removed_orders
    from stages.dedup import DedupConfig

    rng = np.random.default_rng(7)
    bands = 6
    rows = []
    for part in range(3):
        for record in range(400):
            rows.append(((part << ORDER_BITS) | record, int(rng.integers(1 << 40)),
                         [int(k) for k in rng.integers(1 << 60, size=bands)]))
    # plant structure: exact copies, near-duplicate pairs, and chains that only connect across bands and parts
    for i in range(0, 300, 7):
        target = rows[(i * 13) % len(rows)]
        rows[i] = (rows[i][0], target[1], rows[i][2])  # exact duplicate of another document
    for i in range(5, 1200, 11):
        a, b, c = rows[i], rows[(i + 401) % len(rows)], rows[(i + 802) % len(rows)]
        b[2][i % bands] = a[2][i % bands]  # a ~ b on one band
        c[2][(i + 1) % bands] = b[2][(i + 1) % bands]  # b ~ c on another: a, b, c one cluster
    parts = []
    for part in range(3):
        path = tmp_path / f"part-{part}.parquet"
        mine = [r for r in rows if r[0] >> ORDER_BITS == part]
        pl.DataFrame({"order": [r[0] for r in mine], "content_hash": [r[1] for r in mine],
                      "minhash_bands": [r[2] for r in mine]},
                     schema={"order": pl.Int64, "content_hash": pl.UInt64,
                             "minhash_bands": pl.List(pl.UInt64)}).write_parquet(path)
        parts.append((part, str(path)))
    config = DedupConfig.model_validate({"minhash": {"num_bands": bands, "rows_per_band": 1},
                                         "rows_per_partition": 1500})  # 1,200 docs x 6 bands -> 5 partitions
    result = deduplicate(parts, len(rows), config, tmp_path / "work", task_options={"num_cpus": 1, "max_retries": 0})
    exact, near = _union_find_duplicates(rows)
    found = {int(o) for part, _ in parts for o in removed_orders(result.removed, part)}
    assert result.partitions == 5 and result.rounds >= 3
    assert (result.exact, result.near) == (len(exact), len(near)) and found == exact | near
    assert len(exact) > 20 and len(near) > 150


def test_band_keys_equal_the_permutations_in_exact_integers():
    """The signature computed with Python's unbounded integers, (a x + b) mod (2**61 - 1), low 32 bits, row
    minimum, against the vectorised one (which folds the modulo into shifts and masks)."""
    hasher = MinHasher(MinHashConfig())
    text = "The quick brown fox jumps over the lazy dog, and then the dog chases the fox round the yard twice."
    hashes = [xxhash.xxh32_intdigest(shingle.encode()) for shingle in hasher.shingles(text, "en")]
    prime = (1 << 61) - 1
    rows = [min(((a * x + b) % prime) & 0xFFFFFFFF for x in hashes)
            for a, b in zip(hasher.a.tolist(), hasher.b.tolist())]
    signature = np.array(rows, dtype=np.uint64).reshape(hasher.config.num_bands, hasher.config.rows_per_band)
    assert hasher.band_keys(text, "en") == [xxhash.xxh64_intdigest(band.tobytes()) for band in signature]
