"""Reference sets must be independent of what the proxy trains on.

A reference set drawn from a base-mix source measures how much base data a candidate displaced, not its quality; one
that shares documents with a candidate measures memorisation. Both are refused before any training, naming the two
sides: by path, and by content (documents compared by a hash of their whitespace-normalised text; documents under
``MIN_CHARS`` characters, such as headings, are left out, as they recur in unrelated text).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import xxhash

from core.config import ConfigError
from core.io import atomic_path, canonical_json
from model.data import DataSource
from verification.config import VerificationConfig
from verification.evaluate import reference_documents
from verification.stage1 import source_fingerprint

MIN_CHARS = 100


def _hashes(documents, cache: Path) -> np.ndarray:
    if cache.is_file():
        return np.load(cache)
    values = np.unique(np.fromiter((xxhash.xxh64_intdigest(" ".join(text.split())) for text in documents
                                    if len(text) >= MIN_CHARS), dtype=np.uint64))
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.save(f, values)
    return values


def _cache(directory: Path, identity) -> Path:
    return directory / (hashlib.sha256(canonical_json([identity, MIN_CHARS]).encode()).hexdigest()[:20] + ".npy")


def check_independence(config: VerificationConfig, candidates) -> None:
    """Refuse (ConfigError) a reference set that shares a file or documents with a base-mix source or a candidate."""
    cache = Path(config.work_dir).resolve() / "document_hashes"
    training = [(f"base_mix source {s.path}", s.path, s.text_column) for s in config.base_mix]
    training += [(f"candidate {c.name} ({c.path})", c.path, c.text_column) for c in candidates]
    for reference in config.evaluation.reference_sets:
        reference_path = Path(reference.path).resolve()
        for what, path, _ in training:
            if Path(path).resolve() == reference_path:
                raise ConfigError(f"evaluation.reference_sets: {reference.name} is the same file as the {what}; "
                                  "a reference must be text no training mix contains")
        fingerprint = source_fingerprint(reference.path, reference.field)
        reference_hashes = _hashes(reference_documents(reference), _cache(cache, ["reference", fingerprint]))
        for what, path, column in training:
            hashes = _hashes(DataSource(path, text_column=column).documents(),
                             _cache(cache, ["training", source_fingerprint(path, column)]))
            shared = np.intersect1d(reference_hashes, hashes).size
            if shared:
                raise ConfigError(f"evaluation.reference_sets: {reference.name} shares {shared} document(s) with the "
                                  f"{what}; a reference must be text no training mix contains")
