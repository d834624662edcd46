"""MinHash LSH against exact Jaccard similarity: the duplicate rate follows the S-curve that bands x rows imply."""

from __future__ import annotations

import math

import numpy as np

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
