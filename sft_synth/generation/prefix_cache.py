"""Automatic prefix caching: the KV of prompts and answers, found again by later prompts that begin with them.

Multi-turn synthesis prompts every turn with the whole dialogue so far (system prompt, seed material, earlier
turns), so without reuse each turn prefills again what the previous turn already computed: prefill grows with the
square of the turns. A prompt is kept here with both models' keys and values as soon as it is prefilled (so that
prompts admitted while it decodes find it too), and replaced by its prompt and answer when its row finishes; a new
prompt that starts with the same tokens copies them and prefills only the rest. Keys and values of a token depend
only on the tokens before it and its position (real tokens counted, so padding does not matter), which is what
makes a copy equal to a recomputation, up to float rounding.

Lookups go by block, as vLLM's automatic prefix caching does: a chained hash per BLOCK_TOKENS-token block, one dict
probe per block, then the hit is confirmed token by token and extended past the last whole block. Capacity is in
tokens; the least recently used entries go first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16

# Per model index (0 = the target, 1 = the draft): per-layer keys and values [heads, tokens, head_dim].
LayerKV = tuple[list[torch.Tensor], list[torch.Tensor]]


@dataclass(eq=False)
class PrefixEntry:
    token_ids: list[int]
    kv: dict[int, LayerKV]
    block_hashes: list[int]


def block_hashes(token_ids: list[int]) -> list[int]:
    """Chained hashes of the whole blocks of token_ids: the j-th names the first (j + 1) blocks."""
    hashes, previous = [], 0
    for start in range(0, len(token_ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        previous = hash((previous, tuple(token_ids[start : start + BLOCK_TOKENS])))
        hashes.append(previous)
    return hashes


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    def __init__(self, capacity_tokens: int):
        if capacity_tokens < 1:
            raise ValueError(f"a prefix cache needs a capacity of at least one token, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self.entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # by id(entry), least recently used first
        self.index: dict[int, PrefixEntry] = {}  # block hash -> the newest entry holding that prefix
        self.tokens = 0

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.index.clear()
        self.tokens = 0

    def lookup(self, token_ids: list[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with token_ids (at least one whole block) and that prefix's length."""
        found = None
        for block_hash in block_hashes(token_ids):
            entry = self.index.get(block_hash)
            if entry is None:
                break
            found = entry
        if found is None:
            return None, 0
        length = common_prefix_length(found.token_ids, token_ids)
        if length < BLOCK_TOKENS:  # a hash collision: the tokens differ
            return None, 0
        self.entries.move_to_end(id(found))
        return found, length

    def store(self, token_ids: list[int], kv: dict[int, LayerKV]) -> PrefixEntry | None:
        """Keep token_ids with their keys and values; None where there is nothing to find them by (under one block)
        or no room."""
        if not BLOCK_TOKENS <= len(token_ids) <= self.capacity_tokens:
            return None
        entry = PrefixEntry(token_ids, kv, block_hashes(token_ids))
        for block_hash in entry.block_hashes:
            self.index[block_hash] = entry
        self.entries[id(entry)] = entry
        self.tokens += len(token_ids)
        while self.tokens > self.capacity_tokens:
            self.discard(next(iter(self.entries.values())))
        return entry

    def discard(self, entry: PrefixEntry) -> None:
        if self.entries.pop(id(entry), None) is None:
            return
        self.tokens -= len(entry.token_ids)
        for block_hash in entry.block_hashes:
            if self.index.get(block_hash) is entry:
                del self.index[block_hash]
