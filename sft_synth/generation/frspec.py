"""FR-Spec: a frequency-ranked draft vocabulary.

Token frequencies are counted over a corpus with the *target's* tokenizer and saved beside the draft; the draft's
LM head then scores only the most frequent fraction of the vocabulary (25% by default), which removes most of the
LM-head cost of a small draft. The target still verifies over the full vocabulary, so decoding stays lossless:
the draft distribution is simply zero outside the subset.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from core.io import atomic_write_bytes
from core.versions import resolve_parquet_files

FREQUENCIES_FILE = "frspec_token_counts.safetensors"


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def _text_batches(source: Path, text_column: str, batch_size: int):
    """Yield lists of texts: paragraphs of a text file, or the text column of a dataset version's Parquet shards."""
    if source.is_file() and source.suffix != ".parquet":
        with open(source, encoding="utf-8") as f:
            batch: list[str] = []
            for line in f:
                batch.append(line)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        return
    for path in resolve_parquet_files(source):
        parquet = pq.ParquetFile(path)
        if text_column not in parquet.schema_arrow.names:
            raise KeyError(f"{path} has no column {text_column!r} (columns: {parquet.schema_arrow.names})")
        for record_batch in parquet.iter_batches(columns=[text_column], batch_size=batch_size):
            yield [text for text in record_batch.column(0).to_pylist() if text]


@dataclass
class TokenFrequencies:
    """Occurrences of every token id of one tokenizer over one corpus."""

    counts: torch.Tensor  # [V] int64
    tokenizer_fingerprint: str
    source: str

    @classmethod
    def count(
        cls,
        source: str | Path,
        tokenizer: Tokenizer,
        *,
        text_column: str = "content",
        batch_size: int = 1024,
    ) -> TokenFrequencies:
        """Stream a corpus (a dataset version, Parquet file or glob, or a UTF-8 text file) and count token ids."""
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        counts = np.zeros(vocab_size, dtype=np.int64)
        for texts in tqdm(_text_batches(Path(source), text_column, batch_size), desc="FR-Spec counting", unit="batch"):
            ids = [np.asarray(enc.ids, dtype=np.int64) for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]
            if ids:
                counts += np.bincount(np.concatenate(ids), minlength=vocab_size)
        return cls(torch.from_numpy(counts), tokenizer_fingerprint(tokenizer), str(source))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FREQUENCIES_FILE
        metadata = {"tokenizer_fingerprint": self.tokenizer_fingerprint, "source": self.source}
        atomic_write_bytes(path, save_safetensors_bytes({"counts": self.counts.contiguous()}, metadata=metadata))
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> TokenFrequencies:
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / FREQUENCIES_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"FR-Spec token frequencies not found at {path}; count them with "
                "TokenFrequencies.count(corpus, target_tokenizer).save(draft_dir)"
            )
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            counts = f.get_tensor("counts")
        return cls(counts, metadata.get("tokenizer_fingerprint", ""), metadata.get("source", ""))

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        if self.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
            raise ValueError(
                f"FR-Spec frequencies were counted with tokenizer {self.tokenizer_fingerprint}, "
                f"but the target's tokenizer is {tokenizer_fingerprint(tokenizer)}: recount with the target's tokenizer"
            )

    def top_tokens(self, fraction: float, always_include: tuple[int, ...] = ()) -> torch.Tensor:
        """Ids of the ceil(fraction * V) most frequent tokens (ties broken by lower id) plus always_include, sorted."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"FR-Spec fraction must be in (0, 1], got {fraction}")
        size = math.ceil(fraction * self.counts.numel())
        ranked = torch.argsort(-self.counts, stable=True)[:size]
        extra = torch.tensor(always_include, dtype=torch.long)
        return torch.unique(torch.cat([ranked, extra]))


class FRSpecHead(nn.Module):
    """The draft's LM head restricted to a vocabulary subset: logits over the subset only."""

    def __init__(self, lm_head_weight: torch.Tensor, token_ids: torch.Tensor):
        super().__init__()
        self.register_buffer("token_ids", token_ids.to(lm_head_weight.device), persistent=False)
        self.register_buffer("weight", lm_head_weight.detach()[self.token_ids].contiguous(), persistent=False)
        self.vocab_size = lm_head_weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] (already scaled as the model's LM head expects) -> logits [..., S]."""
        return hidden.to(self.weight.dtype) @ self.weight.T

    def scatter_to_vocab(self, subset_values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[..., S] values over the subset -> [..., V], `fill` elsewhere."""
        full = subset_values.new_full((*subset_values.shape[:-1], self.vocab_size), fill)
        return full.index_copy_(-1, self.token_ids, subset_values)
