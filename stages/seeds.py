"""Seed pools for the quality classifier: positive and negative documents from files or earlier dataset versions.

A pool is a list of sources (Parquet, JSONL(.gz), plain text split into paragraphs or lines, or a dataset version
directory); each source can be capped and sampled, the pool as a whole can be sampled to a size, and the two
pools can be balanced. Every draw uses a seeded generator, so the same config and inputs give the same pools.
Each source is identified for the classifier's metadata by its dataset version id or its file's sha256.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field, NonNegativeInt, PositiveInt

from core.config import Strict
from core.io import sha256_file
from core.versions import DatasetVersion

SeedFormat = Literal["parquet", "jsonl", "text", "dataset"]


class SeedSource(Strict):
    path: str = Field(description="a file or a dataset version (or root); relative paths are relative to the config")
    format: SeedFormat | None = Field(None, description="default: a directory is a dataset version, else the suffix")
    text_key: str | None = Field(None, description="column/field holding the text; default content, else text")
    split: Literal["document", "paragraph", "line"] = Field(
        "paragraph", description="how a text file is cut into documents (blank-line paragraphs by default)"
    )
    min_chars: NonNegativeInt = Field(0, description="skip documents shorter than this (e.g. headings)")
    max_documents: PositiveInt | None = Field(None, description="sample at most this many from the source")


class SeedPoolConfig(Strict):
    sources: list[SeedSource] = Field(min_length=1)
    size: PositiveInt | None = Field(None, description="sample the whole pool down to this many documents")


class SeedsConfig(Strict):
    positive: SeedPoolConfig
    negative: SeedPoolConfig
    balance: Literal["none", "downsample", "upsample"] = Field(
        "downsample", description="equalise the pools: sample the larger down, or repeat the smaller"
    )
    seed: int = 0


class SeedPoolError(ValueError):
    """A seed pool that cannot train a classifier: empty, missing, or unreadable."""


@dataclass
class SeedPool:
    texts: list[str]
    sources: list[dict] = field(default_factory=list)  # path, format, id (version id or sha256), documents


@dataclass
class SeedPools:
    positive: SeedPool
    negative: SeedPool


def _format(path: Path, declared: SeedFormat | None) -> SeedFormat:
    if declared:
        return declared
    if path.is_dir():
        return "dataset"
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".txt"):
        return "text"
    raise SeedPoolError(f"{path}: cannot tell the seed format from the name; set format: parquet|jsonl|text|dataset")


def _parquet_texts(paths: list[Path], text_key: str | None) -> list[str]:
    texts: list[str] = []
    for path in paths:
        names = pq.read_schema(path).names
        key = text_key or next((k for k in ("content", "text") if k in names), None)
        if key not in names:
            raise SeedPoolError(f"{path}: no text column {text_key or 'content/text'!r} (columns: {names})")
        texts += [t for t in pq.read_table(path, columns=[key])[key].to_pylist() if t]
    return texts


def _jsonl_texts(path: Path, text_key: str | None) -> list[str]:
    texts = []
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SeedPoolError(f"{path}:{number}: not valid JSON: {error}") from None
            key = text_key or ("content" if "content" in record else "text")
            if isinstance(record.get(key), str) and record[key]:
                texts.append(record[key])
    return texts


def _text_file_texts(path: Path, split: str) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        whole = f.read().replace("\r\n", "\n")
    if split == "document":
        return [whole]
    pieces = re.split(r"\n\s*\n", whole) if split == "paragraph" else whole.split("\n")
    return [piece.strip() for piece in pieces if piece.strip()]


def read_source(source: SeedSource, base_dir: Path) -> tuple[list[str], dict]:
    """A source's documents, and how the classifier's metadata identifies it."""
    path = Path(source.path) if Path(source.path).is_absolute() else base_dir / source.path
    if not path.exists():
        raise SeedPoolError(f"seed source not found: {path}")
    kind = _format(path, source.format)
    if kind == "dataset":
        version = DatasetVersion.open(path)
        texts, identity = _parquet_texts(version.shard_paths, source.text_key), version.version_id
    elif kind == "parquet":
        texts, identity = _parquet_texts([path], source.text_key), "sha256:" + sha256_file(path)
    elif kind == "jsonl":
        texts, identity = _jsonl_texts(path, source.text_key), "sha256:" + sha256_file(path)
    else:
        texts, identity = _text_file_texts(path, source.split), "sha256:" + sha256_file(path)
    texts = [t for t in texts if len(t) >= source.min_chars]
    return texts, {"path": str(source.path), "format": kind, "id": identity, "documents": len(texts)}


def _sample(texts: list[str], size: int | None, rng: np.random.Generator) -> list[str]:
    if size is None or size >= len(texts):
        return texts
    keep = np.sort(rng.choice(len(texts), size=size, replace=False))
    return [texts[i] for i in keep]


def assemble_pool(config: SeedPoolConfig, base_dir: Path, rng: np.random.Generator, which: str) -> SeedPool:
    texts: list[str] = []
    sources = []
    for source in config.sources:
        found, identity = read_source(source, base_dir)
        found = _sample(found, source.max_documents, rng)
        identity["sampled"] = len(found)
        texts += found
        sources.append(identity)
    if not texts:
        raise SeedPoolError(
            f"seeds.{which}: the pool is empty: no documents in {[s['path'] for s in sources]} "
            "(check the paths, text_key and min_chars)"
        )
    return SeedPool(_sample(texts, config.size, rng), sources)


def assemble_seed_pools(config: SeedsConfig, base_dir: Path) -> SeedPools:
    """Both pools, sampled (not yet balanced). Raises ``SeedPoolError`` for an empty pool or pools that share all
    text."""
    rng = np.random.default_rng(config.seed)
    positive = assemble_pool(config.positive, base_dir, rng, "positive")
    negative = assemble_pool(config.negative, base_dir, rng, "negative")
    if set(positive.texts) == set(negative.texts):
        raise SeedPoolError("seeds: the positive and negative pools hold the same documents: nothing to learn")
    return SeedPools(positive, negative)


def balance_pools(positive: list[str], negative: list[str], mode: str,
                  rng: np.random.Generator) -> tuple[list[str], list[str], dict]:
    """Equalise the two pools: sample the larger down, repeat the smaller, or leave them ("none")."""
    before = {"positive": len(positive), "negative": len(negative)}
    if mode != "none" and positive and negative and len(positive) != len(negative):
        small, large = sorted((positive, negative), key=len)
        if mode == "downsample":
            large = _sample(large, len(small), rng)
        else:
            extra = rng.choice(len(small), size=len(large) - len(small), replace=True)
            small = small + [small[i] for i in extra]
        positive, negative = (small, large) if len(positive) < len(negative) else (large, small)
    return positive, negative, {"mode": mode, "before": before,
                                "after": {"positive": len(positive), "negative": len(negative)}}
