"""Packed training sequences from dataset versions, mixed by ratio, in a seed-determined order.

Each source is tokenised once into a flat uint32 token file (documents joined by ``</s>``), cached by the hash of
its files and the tokenizer, and read through a memory map so sources larger than memory work. A sequence is a
window of seq_len + 1 tokens of that file. The mixed stream is a pure function of (seed, position): sequence k
comes from the source that is furthest behind its ratio (exact proportions at every prefix, no randomness), and
each source walks its windows in a fresh seeded permutation per epoch. Resuming needs only the position and the
per-source counts.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from core.io import atomic_path, atomic_write_text
from core.storage import AnyPath, location, open_input
from core.versions import resolve_parquet_files
from model.tokenizer import eos_id

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")


@dataclass(frozen=True)
class DataSource:
    """A dataset version, dataset root, Parquet file or glob (documents in ``text_column``), a JSON-lines file
    (``.jsonl``, ``.jsonl.gz``: documents in the ``text_column`` field), or a plain-text file whose documents are
    separated by blank lines."""

    path: str
    ratio: float = 1.0
    text_column: str = "content"

    def files(self) -> list[AnyPath]:
        path = location(self.path)
        if path.suffix in TEXT_SUFFIXES or path.name.endswith(JSONL_SUFFIXES):
            if not path.is_file():
                raise FileNotFoundError(f"text source {path} does not exist")
            return [path]
        return resolve_parquet_files(path)

    def documents(self) -> Iterator[str]:
        for file in self.files():
            if file.suffix in TEXT_SUFFIXES:
                yield from _blank_line_documents(file)
            elif file.name.endswith(JSONL_SUFFIXES):
                yield from _jsonl_documents(file, self.text_column)
            else:
                parquet = pq.ParquetFile(open_input(file))
                if self.text_column not in parquet.schema_arrow.names:
                    raise KeyError(
                        f"{file} has no column {self.text_column!r} (columns: {parquet.schema_arrow.names})"
                    )
                for batch in parquet.iter_batches(batch_size=1024, columns=[self.text_column]):
                    yield from (text for text in batch.column(0).to_pylist() if text)


def _text_lines(path: AnyPath) -> io.TextIOWrapper:
    stream = open_input(path)
    return io.TextIOWrapper(gzip.GzipFile(fileobj=stream) if path.name.endswith(".gz") else stream, encoding="utf-8")


def _jsonl_documents(path: AnyPath, field: str) -> Iterator[str]:
    with _text_lines(path) as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row.get(field), str):
                    raise KeyError(f"{path}:{number} has no string field {field!r}")
                if row[field]:
                    yield row[field]


def _blank_line_documents(path: AnyPath) -> Iterator[str]:
    lines: list[str] = []
    with _text_lines(path) as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines)
                lines = []
    if lines:
        yield "".join(lines)


def tokenize_source(
    source: DataSource, tokenizer: Tokenizer, cache_dir: str | Path, batch_size: int = 512
) -> np.ndarray:
    """The source's token stream (uint32 memmap), built on first use; documents end with </s>."""
    files = source.files()
    key = hashlib.sha256()
    key.update(tokenizer.to_str().encode())
    key.update(source.text_column.encode())
    for file in files:
        stat = file.stat()
        key.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    cache_dir = Path(cache_dir)
    token_path = cache_dir / f"tokens-{key.hexdigest()[:20]}.u32"
    if not token_path.is_file():
        separator = eos_id(tokenizer)
        n_docs = n_tokens = 0
        with atomic_path(token_path) as tmp, open(tmp, "wb") as out:
            batch: list[str] = []
            docs = tqdm(source.documents(), desc=f"tokenising {source.path}", unit=" docs", leave=False)
            for text in docs:
                batch.append(text)
                if len(batch) == batch_size:
                    n_tokens += _write_encoded(out, tokenizer, batch, separator)
                    n_docs += len(batch)
                    batch = []
            if batch:
                n_tokens += _write_encoded(out, tokenizer, batch, separator)
                n_docs += len(batch)
            if n_tokens == 0:
                raise ValueError(f"data source {source.path} holds no text")
        meta = {
            "source": source.path,
            "files": [str(f) for f in files],
            "documents": n_docs,
            "tokens": n_tokens,
        }
        atomic_write_text(token_path.with_suffix(".json"), json.dumps(meta, indent=2))
    return np.memmap(token_path, dtype=np.uint32, mode="r")


def _write_encoded(out, tokenizer: Tokenizer, texts: list[str], separator: int) -> int:
    ids = [
        np.asarray(e.ids + [separator], dtype=np.uint32)
        for e in tokenizer.encode_batch(texts, add_special_tokens=False)
    ]
    flat = np.concatenate(ids)
    out.write(flat.tobytes())
    return flat.size


class PackedDataset:
    """Fixed-length sequences from several sources.

    split="train" yields the mixed, shuffled stream via next_batch; split="eval" holds the last eval_fraction of
    each source's windows (eval_fraction=1.0: all of it, for dedicated eval sets) in file order via sequences().
    """

    def __init__(
        self,
        sources: list[DataSource],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        seed: int,
        cache_dir: str | Path,
        split: str = "train",
        eval_fraction: float = 0.0,
    ):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        if not sources:
            raise ValueError("PackedDataset needs at least one source")
        if any(s.ratio <= 0 for s in sources):
            raise ValueError(f"source ratios must be positive: {[s.ratio for s in sources]}")
        self.sources = sources
        self.seq_len = seq_len
        self.seed = seed
        self.split = split
        total_ratio = sum(s.ratio for s in sources)
        self.ratios = [s.ratio / total_ratio for s in sources]
        self.tokens = [tokenize_source(s, tokenizer, cache_dir) for s in sources]
        self.windows: list[range] = []
        for source, tokens in zip(sources, self.tokens):
            n = (len(tokens) - 1) // seq_len
            n_eval = math.ceil(n * eval_fraction)
            part = range(n - n_eval, n) if split == "eval" else range(n - n_eval)
            if len(part) == 0:
                raise ValueError(
                    f"source {source.path} has {len(tokens)} tokens: no {split} sequences of {seq_len} + 1 tokens "
                    f"with eval_fraction={eval_fraction}"
                )
            self.windows.append(part)
        self.position = 0
        self.counts = [0] * len(sources)
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def window(self, source_idx: int, window_idx: int) -> np.ndarray:
        start = window_idx * self.seq_len
        return np.asarray(self.tokens[source_idx][start : start + self.seq_len + 1], dtype=np.int64)

    def _train_window(self, source_idx: int, count: int) -> int:
        windows = self.windows[source_idx]
        epoch, offset = divmod(count, len(windows))
        key = (source_idx, epoch)
        if key not in self._permutations:
            self._permutations = {
                key: np.random.default_rng([self.seed, source_idx, epoch]).permutation(len(windows))
            }
        return windows[self._permutations[key][offset]]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), both [batch_size, seq_len]; labels[t] is the token after input_ids[t]."""
        if self.split != "train":
            raise RuntimeError(
                "next_batch draws from the train stream; iterate an eval split with sequences()"
            )
        rows = []
        for _ in range(batch_size):
            deficits = [r * (self.position + 1) - c for r, c in zip(self.ratios, self.counts)]
            source_idx = max(range(len(deficits)), key=deficits.__getitem__)
            rows.append(self.window(source_idx, self._train_window(source_idx, self.counts[source_idx])))
            self.counts[source_idx] += 1
            self.position += 1
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def sequences(
        self, batch_size: int, max_sequences: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Eval batches in a fixed order: each source's eval windows in file order, at most max_sequences each."""
        rows = [
            self.window(i, w)
            for i, windows in enumerate(self.windows)
            for w in (windows if max_sequences is None else windows[:max_sequences])
        ]
        for start in range(0, len(rows), batch_size):
            batch = torch.from_numpy(np.stack(rows[start : start + batch_size]))
            yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "counts": list(self.counts),
            "seed": self.seed,
            "sources": [s.path for s in self.sources],
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "sources", "seq_len"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"data state was saved with {key}={state[key]!r}, this dataset has {mine[key]!r}"
                )
        self.position, self.counts = state["position"], list(state["counts"])
