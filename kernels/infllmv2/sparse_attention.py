"""InfLLM v2 stage 2 in Triton: exact attention over each query's selected key blocks (forward, dQ, dK/dV).

The selection is per query token and shared by the query heads of a GQA group, so, as in the released kernels
("token-level query, block-level key-value"), a program's tile is TOKENS consecutive query tokens times the
HEADS heads of one group (GROUP padded to a power of two), token-major: a key block is loaded once for every
head that reads it, and a tile spans few tokens, so the union of their selected blocks stays close to the
budget (64 consecutive tokens of one head would visit nearly every block). The tile visits that union and
masks, token by token, the blocks a token did not choose; every tl.dot is a full [rows, block] tile and the
result is exactly per-query sparse attention. The backward mirrors it: dQ walks the same per-tile lists, and
dK/dV walk, for each key block, the list of tiles that selected it, so gradients are written once, with no
atomics, and are deterministic. Which tokens of a tile chose a block is one int64 per (tile, block) pair,
built once by `SparsePlan`, so the kernels never read the [Hkv, Nq, budget] selection itself.
Query-shaped tensors (q, o, dO, dq) share one layout, key-shaped ones (k, v, dk, dv) another.
Reference: `reference.sparse_attention_ref`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import VarlenLayout
from .triton_ops import autotune, configs, load_tile, mma, sequence_bounds, store_tile

LOG2E = 1.4426950408889634


def _attention_shared(meta) -> int:
    """Bytes of shared memory: the resident q and k tiles and num_stages buffers of the two streamed tiles."""
    rows = meta["TOKENS"] * meta["HEADS"]
    row_bytes = 2 * meta["D"]  # bf16
    streamed = 2 * max(rows, meta["BLOCK_SIZE"]) * row_bytes
    return (rows + meta["BLOCK_SIZE"]) * row_bytes + meta["num_stages"] * streamed + 4 * rows * meta["BLOCK_SIZE"]


ATTENTION_CONFIGS = configs([{}], warps=(4, 8), stages=(1, 2))
ATTENTION_KEY = ["GROUP", "HEADS", "TOKENS", "D", "BLOCK_SIZE"]


def tile_shape(group: int, block_m: int) -> tuple[int, int]:
    """(TOKENS, HEADS) of a tile of about block_m rows: the group's heads padded to a power of two."""
    heads = triton.next_power_of_2(group)
    return max(1, block_m // heads), heads


@triton.jit
def _group_rows(tile_start, tile, q_start, seqlen_q, seqlen_k, g, stride_qn, stride_qh, stride_lh,
                GROUP: tl.constexpr, TOKENS: tl.constexpr, HEADS: tl.constexpr):
    """The rows of a tile, token-major: (offset into q-shaped tensors, offset into lse-shaped [Hq, Nq] ones,
    row_ok, key position of the row's token, the token's index in the tile)."""
    r = tl.arange(0, TOKENS * HEADS)
    token, head = r // HEADS, g * GROUP + r % HEADS
    rows = tl.load(tile_start + tile) + token
    row_ok = (rows < seqlen_q) & (r % HEADS < GROUP)
    # int64: Nq * Hq * D passes 2**31 at half a million packed tokens.
    return ((q_start + rows).to(tl.int64) * stride_qn + head * stride_qh, head * stride_lh + q_start + rows,
            row_ok, seqlen_k - seqlen_q + rows, token)


@triton.jit
def _chosen(ROW_MASKS, token):
    """Per row: did its token choose the block? One int64 per (tile, block): bit t for token t of the tile."""
    return ((tl.load(ROW_MASKS) >> token.to(tl.int64)) & 1) != 0


@triton.jit
def _key_block(K, V, k_start, seqlen_k, blk, g, stride_kn, stride_kh, D: tl.constexpr,
               BLOCK_SIZE: tl.constexpr):
    """(kpos, k_ok, k, v) of key block `blk` of kv head g."""
    kpos = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    k_ok = kpos < seqlen_k
    offsets = (k_start + kpos) * stride_kn + g * stride_kh
    return kpos, k_ok, load_tile(K, offsets, k_ok, D), load_tile(V, offsets, k_ok, D)


@triton.jit
def _query_tile(Q, tile_seq, tile_start, tile, cu_seqlens_q, cu_seqlens_k, g, stride_qn, stride_qh, stride_lh,
                GROUP: tl.constexpr, TOKENS: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr):
    """Prologue of a program that owns a query tile: (k_start, seqlen_k, the q tile, the rows: _group_rows)."""
    q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(cu_seqlens_q, cu_seqlens_k, tl.load(tile_seq + tile))
    q_off, l_off, row_ok, pos, token = _group_rows(tile_start, tile, q_start, seqlen_q, seqlen_k, g, stride_qn,
                                                   stride_qh, stride_lh, GROUP, TOKENS, HEADS)
    return k_start, seqlen_k, load_tile(Q, q_off, row_ok, D), q_off, l_off, row_ok, pos, token


@triton.jit
def _listed_block(BLOCKS, MASKS, entry, c, K, V, k_start, seqlen_k, g, stride_kn, stride_kh, pos, token,
                  D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Entry c of a tile's block list: (k, v, allowed [rows, block]: the row's token chose it, causally)."""
    blk = tl.load(BLOCKS + entry + c)
    kpos, k_ok, kb, vb = _key_block(K, V, k_start, seqlen_k, blk, g, stride_kn, stride_kh, D, BLOCK_SIZE)
    allowed = _chosen(MASKS + entry + c, token)[:, None] & (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
    return kb, vb, allowed


@autotune(ATTENTION_CONFIGS, key=ATTENTION_KEY, shared_estimate=_attention_shared)
@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, O, LSE, TILE_BLOCKS, TILE_MASKS, TILE_COUNT, tile_seq, tile_start, cu_seqlens_q, cu_seqlens_k,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_lh, stride_tbh, stride_tbt, stride_tch, qk_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    tile, g = tl.program_id(0), tl.program_id(1)
    k_start, seqlen_k, q, q_off, l_off, row_ok, pos, token = _query_tile(
        Q, tile_seq, tile_start, tile, cu_seqlens_q, cu_seqlens_k, g, stride_qn, stride_qh, stride_lh, GROUP,
        TOKENS, HEADS, D)

    m_i = tl.full([TOKENS * HEADS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TOKENS * HEADS], dtype=tl.float32)
    acc = tl.zeros([TOKENS * HEADS, D], dtype=tl.float32)
    entry = g * stride_tbh + tile * stride_tbt
    for c in range(tl.load(TILE_COUNT + g * stride_tch + tile)):
        kb, vb, allowed = _listed_block(TILE_BLOCKS, TILE_MASKS, entry, c, K, V, k_start, seqlen_k, g, stride_kn,
                                        stride_kh, pos, token, D, BLOCK_SIZE)
        s = tl.where(allowed, mma(q, tl.trans(kb)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that chose none of this block's keys keeps m = -inf; shift by 0 to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(vb.dtype), vb)
        m_i = m_new
    # Every query chose its own (local) block, so l_i > 0 on real rows.
    l_safe = tl.where(row_ok, l_i, 1.0)
    store_tile(O, q_off, row_ok, acc / l_safe[:, None], D)
    tl.store(LSE + l_off, m_i + tl.log2(l_safe), mask=row_ok)


@autotune(ATTENTION_CONFIGS, key=ATTENTION_KEY, shared_estimate=_attention_shared)
@triton.jit
def _sparse_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, TILE_BLOCKS, TILE_MASKS, TILE_COUNT, tile_seq, tile_start,
    cu_seqlens_q, cu_seqlens_k,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_lh, stride_tbh, stride_tbt, stride_tch, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    tile, g = tl.program_id(0), tl.program_id(1)
    k_start, seqlen_k, q, q_off, l_off, row_ok, pos, token = _query_tile(
        Q, tile_seq, tile_start, tile, cu_seqlens_q, cu_seqlens_k, g, stride_qn, stride_qh, stride_lh, GROUP,
        TOKENS, HEADS, D)
    do = load_tile(DO, q_off, row_ok, D)
    lse = tl.load(LSE + l_off, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)

    dq = tl.zeros([TOKENS * HEADS, D], dtype=tl.float32)
    entry = g * stride_tbh + tile * stride_tbt
    for c in range(tl.load(TILE_COUNT + g * stride_tch + tile)):
        kb, vb, allowed = _listed_block(TILE_BLOCKS, TILE_MASKS, entry, c, K, V, k_start, seqlen_k, g, stride_kn,
                                        stride_kh, pos, token, D, BLOCK_SIZE)
        p = tl.where(allowed, tl.exp2(mma(q, tl.trans(kb)) * qk_scale - lse[:, None]), 0.0)
        ds = p * (mma(do, tl.trans(vb)) - delta[:, None])
        dq += mma(ds.to(kb.dtype), kb)
    store_tile(DQ, q_off, row_ok, dq * sm_scale, D)


@autotune(ATTENTION_CONFIGS, key=ATTENTION_KEY, shared_estimate=_attention_shared)
@triton.jit
def _sparse_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KB_TILES, KB_MASKS, KB_COUNT, kb_seq, kb_index, tile_start,
    cu_seqlens_q, cu_seqlens_k,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_lh, stride_kth, stride_ktb, stride_kch, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    kb_id, g = tl.program_id(0), tl.program_id(1)
    q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(cu_seqlens_q, cu_seqlens_k, tl.load(kb_seq + kb_id))
    kpos, k_ok, kb, vb = _key_block(K, V, k_start, seqlen_k, tl.load(kb_index + kb_id), g, stride_kn, stride_kh,
                                    D, BLOCK_SIZE)

    dk = tl.zeros([BLOCK_SIZE, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_SIZE, D], dtype=tl.float32)
    entry = g * stride_kth + kb_id * stride_ktb
    for c in range(tl.load(KB_COUNT + g * stride_kch + kb_id)):
        q_off, l_off, row_ok, pos, token = _group_rows(tile_start, tl.load(KB_TILES + entry + c), q_start,
                                                       seqlen_q, seqlen_k, g, stride_qn, stride_qh, stride_lh,
                                                       GROUP, TOKENS, HEADS)
        q = load_tile(Q, q_off, row_ok, D)
        do = load_tile(DO, q_off, row_ok, D)
        lse = tl.load(LSE + l_off, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
        allowed_t = _chosen(KB_MASKS + entry + c, token)[None, :] & (kpos[:, None] <= pos[None, :]) & k_ok[:, None]
        p_t = tl.where(allowed_t, tl.exp2(mma(kb, tl.trans(q)) * qk_scale - lse[None, :]), 0.0)  # [block, rows]
        dv += mma(p_t.to(do.dtype), do)
        ds_t = p_t * (mma(vb, tl.trans(do)) - delta[None, :])
        dk += mma(ds_t.to(q.dtype), q)
    offsets = (k_start + kpos) * stride_kn + g * stride_kh
    store_tile(DK, offsets, k_ok, dk * sm_scale, D)
    store_tile(DV, offsets, k_ok, dv, D)


def _grouped_lists(keys: torch.Tensor, values: torch.Tensor, num_groups: int, width: int):
    """Split sorted unique keys (group * width + member) into -1 padded [num_groups, max] member and value
    tables (values padded with 0) and the [num_groups] counts."""
    group, member = keys // width, keys % width
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(keys), device=keys.device) - starts[group]
    shape = (num_groups, max(int(counts.max()), 1) if num_groups else 1)
    table = torch.full(shape, -1, dtype=torch.int32, device=keys.device)
    table[group, slot] = member.to(torch.int32)
    value_table = torch.zeros(shape, dtype=values.dtype, device=keys.device)
    value_table[group, slot] = values
    return table, value_table, counts.to(torch.int32)


class SparsePlan:
    """Which key blocks each tile of `tokens` query tokens visits, which tiles each key block is visited by, and
    for each such (tile, block) pair a token mask: an int64 whose bit t says whether token t of the tile chose
    the block."""

    def __init__(self, block_idx: torch.Tensor, layout: VarlenLayout, tokens: int):
        if not 1 <= tokens <= 64:
            raise ValueError(f"a tile holds 1 to 64 tokens (one int64 mask per tile and block), got {tokens}")
        hkv = block_idx.shape[0]
        self.tokens = tokens
        self.tile_seq, self.tile_start = layout.query_tiles(tokens)
        row_tile, row_in_tile = layout.row_tiles(tokens)
        self.kb_seq, self.kb_index, seq_first_kb = layout.key_blocks
        n_tiles, n_kb, nb = len(self.tile_seq), len(self.kb_seq), layout.max_blocks
        pairs, masks = [], []
        for g in range(hkv):  # one kv head at a time bounds the int64 temporaries to Nq * budget
            valid = block_idx[g] >= 0
            rows = valid.nonzero()[:, 0]
            pair = (g * n_tiles + row_tile[rows]) * nb + block_idx[g][valid].long()
            unique, inverse = torch.unique(pair, return_inverse=True)  # sorted: blocks ascending per tile
            # Distinct powers of two per pair: their sum is their bitwise or (bit 63 wraps to the sign bit).
            bits = torch.ones_like(rows) << row_in_tile[rows]
            pairs.append(unique)
            masks.append(torch.zeros_like(unique).scatter_add_(0, inverse, bits))
        tile_block, token_mask = torch.cat(pairs), torch.cat(masks)
        tiles, blocks = tile_block // nb, tile_block % nb
        self.tile_blocks, self.tile_masks, self.tile_count = _grouped_lists(tile_block, token_mask,
                                                                            hkv * n_tiles, nb)
        self.tile_blocks, self.tile_masks = (t.view(hkv, n_tiles, -1) for t in (self.tile_blocks, self.tile_masks))
        self.tile_count = self.tile_count.view(hkv, n_tiles)
        head_of, tile_of = tiles // n_tiles, tiles % n_tiles
        kb_global = seq_first_kb.long()[self.tile_seq.long()[tile_of]] + blocks
        kb_tile, order = torch.sort((head_of * n_kb + kb_global) * n_tiles + tile_of)
        self.kb_tiles, self.kb_masks, self.kb_count = _grouped_lists(kb_tile, token_mask[order], hkv * n_kb,
                                                                     n_tiles)
        self.kb_tiles, self.kb_masks = (t.view(hkv, n_kb, -1) for t in (self.kb_tiles, self.kb_masks))
        self.kb_count = self.kb_count.view(hkv, n_kb)


def _shape_args(q, k, plan, block_size):
    group = q.shape[1] // k.shape[1]
    return {"GROUP": group, "HEADS": triton.next_power_of_2(group), "TOKENS": plan.tokens, "D": q.shape[2],
            "BLOCK_SIZE": block_size}


def _sparse_forward(q, k, v, layout, plan, block_size, scale):
    nq, hq, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(hq, nq, dtype=torch.float32, device=q.device)
    _sparse_fwd_kernel[(len(plan.tile_seq), k.shape[1])](
        q, k, v, o, lse, plan.tile_blocks, plan.tile_masks, plan.tile_count, plan.tile_seq, plan.tile_start,
        layout.cu_seqlens_q, layout.cu_seqlens_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        lse.stride(0), plan.tile_blocks.stride(0), plan.tile_blocks.stride(1), plan.tile_count.stride(0),
        scale * LOG2E, **_shape_args(q, k, plan, block_size),
    )
    return o, lse


def _sparse_backward(do, q, k, v, o, lse, layout, plan, block_size, scale):
    hkv = k.shape[1]
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).transpose(0, 1).contiguous()  # [Hq, Nq], rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    shape_args = _shape_args(q, k, plan, block_size)
    _sparse_bwd_dq_kernel[(len(plan.tile_seq), hkv)](
        q, k, v, do, dq, lse, delta, plan.tile_blocks, plan.tile_masks, plan.tile_count, plan.tile_seq,
        plan.tile_start, layout.cu_seqlens_q, layout.cu_seqlens_k, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), lse.stride(0), plan.tile_blocks.stride(0), plan.tile_blocks.stride(1),
        plan.tile_count.stride(0), scale * LOG2E, scale, **shape_args,
    )
    _sparse_bwd_dkdv_kernel[(len(plan.kb_seq), hkv)](
        q, k, v, do, dk, dv, lse, delta, plan.kb_tiles, plan.kb_masks, plan.kb_count, plan.kb_seq,
        plan.kb_index, plan.tile_start, layout.cu_seqlens_q, layout.cu_seqlens_k, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), lse.stride(0), plan.kb_tiles.stride(0), plan.kb_tiles.stride(1),
        plan.kb_count.stride(0), scale * LOG2E, scale, **shape_args,
    )
    return dq, dk, dv


class SparseAttentionFunction(torch.autograd.Function):
    """Block-sparse attention with gradients to q, k, v; the block selection is a constant."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, layout: VarlenLayout, block_size: int, scale: float, block_m: int):
        # Query-shaped and key-shaped tensors share strides in the kernels: all contiguous.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        tokens, _ = tile_shape(q.shape[1] // k.shape[1], block_m)
        plan = SparsePlan(block_idx, layout, tokens)
        o, lse = _sparse_forward(q, k, v, layout, plan, block_size, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.plan, ctx.block_size, ctx.scale = layout, plan, block_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _sparse_backward(do, q, k, v, o, lse, ctx.layout, ctx.plan, ctx.block_size, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def sparse_attention(q, k, v, block_idx, layout: VarlenLayout, block_size: int, scale: float | None = None,
                     block_m: int = 64) -> torch.Tensor:
    """Packed q [Nq, Hq, D], k/v [Nk, Hkv, D], block_idx [Hkv, Nq, budget] -> out [Nq, Hq, D].

    block_m: rows per program, i.e. block_m // (Hq / Hkv rounded up to a power of two) tokens (at least 1).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return SparseAttentionFunction.apply(q, k, v, block_idx, layout, block_size, scale, block_m)
