"""Host-side bookkeeping of a packed (varlen) batch: which tile of queries or block of keys a program owns.

Tiles never straddle two sequences, so each Triton program reads one sequence's offsets and no program is
launched for padding. Built once per call from cu_seqlens (one device-to-host copy, as flash-attn's varlen
API needs max_seqlen).
"""

from __future__ import annotations

from functools import cached_property

import torch


class VarlenLayout:
    def __init__(self, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_size: int):
        if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.ndim != 1:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be 1-D with one entry per sequence plus one")
        self.device = cu_seqlens_q.device
        self.cu_seqlens_q = cu_seqlens_q.to(torch.int32)
        self.cu_seqlens_k = cu_seqlens_k.to(torch.int32)
        self.seqlens_q = torch.diff(cu_seqlens_q.cpu()).tolist()
        self.seqlens_k = torch.diff(cu_seqlens_k.cpu()).tolist()
        if any(tq > tk or tq < 1 for tq, tk in zip(self.seqlens_q, self.seqlens_k)):
            raise ValueError("every sequence needs 1 <= Tq <= Tk (queries are the last Tq keys)")
        self.block_size = block_size
        self.num_queries = int(cu_seqlens_q[-1])
        self.blocks_per_seq = [-(-tk // block_size) for tk in self.seqlens_k]
        self.max_blocks = max(self.blocks_per_seq)
        self._tiles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @cached_property
    def positions(self) -> torch.Tensor:
        """Position of each packed query inside its sequence, [Nq] int32."""
        pos = [torch.arange(tk - tq, tk, dtype=torch.int32) for tq, tk in zip(self.seqlens_q, self.seqlens_k)]
        return torch.cat(pos).to(self.device)

    def query_tiles(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile_seq, tile_start) [n_tiles] int32: each tile of `size` query tokens' sequence and first token."""
        if size not in self._tiles:
            seq = [s for s, tq in enumerate(self.seqlens_q) for _ in range(-(-tq // size))]
            start = [i * size for tq in self.seqlens_q for i in range(-(-tq // size))]
            as_int = {"dtype": torch.int32, "device": self.device}
            self._tiles[size] = torch.tensor(seq, **as_int), torch.tensor(start, **as_int)
        return self._tiles[size]

    def row_tiles(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_tile, row_in_tile) [Nq] int64: each packed query token's tile and its index inside the tile."""
        tile, offset, first = [], [], 0
        for tq in self.seqlens_q:
            rows = torch.arange(tq)
            tile.append(first + rows // size)
            offset.append(rows % size)
            first += -(-tq // size)
        return torch.cat(tile).to(self.device), torch.cat(offset).to(self.device)

    @cached_property
    def key_blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kb_seq, kb_index, seq_first_kb): each global key block's sequence and index in it."""
        seq = [s for s, n in enumerate(self.blocks_per_seq) for _ in range(n)]
        index = [b for n in self.blocks_per_seq for b in range(n)]
        first = [0]
        for n in self.blocks_per_seq[:-1]:
            first.append(first[-1] + n)
        as_int = {"dtype": torch.int32, "device": self.device}
        return torch.tensor(seq, **as_int), torch.tensor(index, **as_int), torch.tensor(first, **as_int)
