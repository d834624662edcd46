"""InfLLM v2 stage 2 in Triton: exact attention over each query's selected key blocks (forward, dQ, dK/dV).

Selection is per query (and shared by the query heads of a GQA group), but a program works on a tile of
BLOCK_M consecutive queries: it visits the union of the tile's selected blocks and masks, row by row, the
blocks a query did not choose. Neighbouring queries share their init and local blocks and mostly their top
blocks, so the union stays close to top-k while every tl.dot is a full [BLOCK_M, block] tile; the result is
exactly per-query sparse attention. The backward mirrors it: dQ walks the same per-tile lists, and dK/dV
walk, for each key block, the list of query tiles that selected it, so gradients are written once, with no
atomics, and are deterministic.
Reference: `reference.sparse_attention_ref`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import VarlenLayout
from .triton_ops import mma

LOG2E = 1.4426950408889634


@triton.jit
def _selected_rows(IDX, g, q_rows, row_ok, blk, stride_ih, stride_in, TOPK: tl.constexpr,
                   TOPK_P2: tl.constexpr):
    """[BLOCK_M] bool: which query rows chose key block `blk`."""
    t = tl.arange(0, TOPK_P2)
    sel = tl.load(IDX + g * stride_ih + q_rows[:, None] * stride_in + t[None, :],
                  mask=row_ok[:, None] & (t < TOPK)[None, :], other=-1)
    return tl.sum((sel == blk).to(tl.int32), 1) > 0


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, O, LSE, IDX, TILE_BLOCKS, TILE_COUNT, tile_seq, tile_start, cu_seqlens_q, cu_seqlens_k,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    stride_lh, stride_ih, stride_in, stride_tbh, stride_tbt, stride_tch, qk_scale,
    GROUP: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    tile, h = tl.program_id(0), tl.program_id(1)
    g = h // GROUP
    seq = tl.load(tile_seq + tile)
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    k_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    rows = tl.load(tile_start + tile) + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    pos = seqlen_k - seqlen_q + rows
    d = tl.arange(0, D)
    q = tl.load(Q + (q_start + rows)[:, None] * stride_qn + h * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for c in range(tl.load(TILE_COUNT + g * stride_tch + tile)):
        blk = tl.load(TILE_BLOCKS + g * stride_tbh + tile * stride_tbt + c)
        kpos = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        k_ok = kpos < seqlen_k
        kb = tl.load(K + (k_start + kpos)[:, None] * stride_kn + g * stride_kh + d[None, :],
                     mask=k_ok[:, None], other=0.0)
        vb = tl.load(V + (k_start + kpos)[:, None] * stride_vn + g * stride_vh + d[None, :],
                     mask=k_ok[:, None], other=0.0)
        chosen = _selected_rows(IDX, g, q_start + rows, row_ok, blk, stride_ih, stride_in, TOPK, TOPK_P2)
        allowed = chosen[:, None] & (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
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
    out = acc / l_safe[:, None]
    tl.store(O + (q_start + rows)[:, None] * stride_on + h * stride_oh + d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + h * stride_lh + q_start + rows, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _sparse_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, IDX, TILE_BLOCKS, TILE_COUNT, tile_seq, tile_start,
    cu_seqlens_q, cu_seqlens_k,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dqn, stride_dqh, stride_lh, stride_ih, stride_in, stride_tbh, stride_tbt, stride_tch,
    qk_scale, sm_scale,
    GROUP: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    tile, h = tl.program_id(0), tl.program_id(1)
    g = h // GROUP
    seq = tl.load(tile_seq + tile)
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    k_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    rows = tl.load(tile_start + tile) + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    pos = seqlen_k - seqlen_q + rows
    d = tl.arange(0, D)
    q = tl.load(Q + (q_start + rows)[:, None] * stride_qn + h * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + (q_start + rows)[:, None] * stride_don + h * stride_doh + d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + h * stride_lh + q_start + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for c in range(tl.load(TILE_COUNT + g * stride_tch + tile)):
        blk = tl.load(TILE_BLOCKS + g * stride_tbh + tile * stride_tbt + c)
        kpos = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        k_ok = kpos < seqlen_k
        kb = tl.load(K + (k_start + kpos)[:, None] * stride_kn + g * stride_kh + d[None, :],
                     mask=k_ok[:, None], other=0.0)
        vb = tl.load(V + (k_start + kpos)[:, None] * stride_vn + g * stride_vh + d[None, :],
                     mask=k_ok[:, None], other=0.0)
        chosen = _selected_rows(IDX, g, q_start + rows, row_ok, blk, stride_ih, stride_in, TOPK, TOPK_P2)
        allowed = chosen[:, None] & (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
        p = tl.where(allowed, tl.exp2(mma(q, tl.trans(kb)) * qk_scale - lse[:, None]), 0.0)
        dp = mma(do, tl.trans(vb))
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(kb.dtype), kb)
    tl.store(DQ + (q_start + rows)[:, None] * stride_dqn + h * stride_dqh + d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _sparse_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, IDX, KB_TILES, KB_COUNT, kb_seq, kb_index, tile_start,
    cu_seqlens_q, cu_seqlens_k,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_lh, stride_ih, stride_in,
    stride_kth, stride_ktb, stride_kch, qk_scale, sm_scale,
    GROUP: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    kb_id, g = tl.program_id(0), tl.program_id(1)
    seq = tl.load(kb_seq + kb_id)
    blk = tl.load(kb_index + kb_id)
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    k_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - k_start
    kpos = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    k_ok = kpos < seqlen_k
    d = tl.arange(0, D)
    kb = tl.load(K + (k_start + kpos)[:, None] * stride_kn + g * stride_kh + d[None, :],
                 mask=k_ok[:, None], other=0.0)
    vb = tl.load(V + (k_start + kpos)[:, None] * stride_vn + g * stride_vh + d[None, :],
                 mask=k_ok[:, None], other=0.0)

    dk = tl.zeros([BLOCK_SIZE, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_SIZE, D], dtype=tl.float32)
    for c in range(tl.load(KB_COUNT + g * stride_kch + kb_id)):
        rows = tl.load(tile_start + tl.load(KB_TILES + g * stride_kth + kb_id * stride_ktb + c))
        rows = rows + tl.arange(0, BLOCK_M)
        row_ok = rows < seqlen_q
        pos = seqlen_k - seqlen_q + rows
        chosen = _selected_rows(IDX, g, q_start + rows, row_ok, blk, stride_ih, stride_in, TOPK, TOPK_P2)
        allowed_t = chosen[None, :] & (kpos[:, None] <= pos[None, :]) & k_ok[:, None]  # [BLOCK_SIZE, M]
        for hh in range(GROUP):
            h = g * GROUP + hh
            q = tl.load(Q + (q_start + rows)[:, None] * stride_qn + h * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + (q_start + rows)[:, None] * stride_don + h * stride_doh + d[None, :],
                         mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + h * stride_lh + q_start + rows, mask=row_ok, other=0.0)
            p_t = tl.where(allowed_t, tl.exp2(mma(kb, tl.trans(q)) * qk_scale - lse[None, :]), 0.0)
            dv += mma(p_t.to(do.dtype), do)
            ds_t = p_t * (mma(vb, tl.trans(do)) - delta[None, :])
            dk += mma(ds_t.to(q.dtype), q)
    tl.store(DK + (k_start + kpos)[:, None] * stride_dkn + g * stride_dkh + d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
    tl.store(DV + (k_start + kpos)[:, None] * stride_dvn + g * stride_dvh + d[None, :],
             dv.to(DV.dtype.element_ty), mask=k_ok[:, None])


def _grouped_lists(keys: torch.Tensor, num_groups: int, width: int):
    """Split sorted unique keys (group * width + member) into a -1 padded [num_groups, max] member table."""
    group, member = keys // width, keys % width
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(keys), device=keys.device) - starts[group]
    table = torch.full((num_groups, max(int(counts.max()), 1) if num_groups else 1), -1,
                       dtype=torch.int32, device=keys.device)
    table[group, slot] = member.to(torch.int32)
    return table, counts.to(torch.int32)


class SparsePlan:
    """Which key blocks each query tile visits, and which query tiles each key block is visited by."""

    def __init__(self, block_idx: torch.Tensor, layout: VarlenLayout, block_m: int):
        hkv = block_idx.shape[0]
        self.block_m = block_m
        self.tile_seq, self.tile_start, row_tile = layout.query_tiles(block_m)
        self.kb_seq, self.kb_index, seq_first_kb = layout.key_blocks
        n_tiles, n_kb, nb = len(self.tile_seq), len(self.kb_seq), layout.max_blocks
        head = torch.arange(hkv, device=block_idx.device)[:, None, None]
        valid = block_idx >= 0
        tile_block = (head * n_tiles + row_tile[None, :, None]) * nb + block_idx.long()
        tile_block = torch.unique(tile_block[valid])  # sorted: blocks in ascending order per tile
        tiles, blocks = tile_block // nb, tile_block % nb
        self.tile_blocks, self.tile_count = _grouped_lists(tile_block, hkv * n_tiles, nb)
        self.tile_blocks = self.tile_blocks.view(hkv, n_tiles, -1)
        self.tile_count = self.tile_count.view(hkv, n_tiles)
        head_of, tile_of = tiles // n_tiles, tiles % n_tiles
        kb_global = seq_first_kb.long()[self.tile_seq.long()[tile_of]] + blocks
        kb_tile = torch.sort((head_of * n_kb + kb_global) * n_tiles + tile_of).values
        self.kb_tiles, self.kb_count = _grouped_lists(kb_tile, hkv * n_kb, n_tiles)
        self.kb_tiles = self.kb_tiles.view(hkv, n_kb, -1)
        self.kb_count = self.kb_count.view(hkv, n_kb)


def _sparse_forward(q, k, v, block_idx, layout, plan, block_size, scale):
    nq, hq, d = q.shape
    hkv, _, topk = block_idx.shape
    o = torch.empty_like(q)
    lse = torch.empty(hq, nq, dtype=torch.float32, device=q.device)
    _sparse_fwd_kernel[(len(plan.tile_seq), hq)](
        q, k, v, o, lse, block_idx, plan.tile_blocks, plan.tile_count, plan.tile_seq, plan.tile_start,
        layout.cu_seqlens_q, layout.cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        lse.stride(0), block_idx.stride(0), block_idx.stride(1), plan.tile_blocks.stride(0),
        plan.tile_blocks.stride(1), plan.tile_count.stride(0), scale * LOG2E,
        GROUP=hq // hkv, TOPK=topk, TOPK_P2=triton.next_power_of_2(topk), D=d, BLOCK_M=plan.block_m,
        BLOCK_SIZE=block_size,
    )
    return o, lse


def _sparse_backward(do, q, k, v, o, lse, block_idx, layout, plan, block_size, scale):
    hq, d = q.shape[1:]
    hkv, _, topk = block_idx.shape
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).transpose(0, 1).contiguous()  # [Hq, Nq], rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    shape_args = {"GROUP": hq // hkv, "TOPK": topk, "TOPK_P2": triton.next_power_of_2(topk), "D": d,
                  "BLOCK_M": plan.block_m, "BLOCK_SIZE": block_size}
    _sparse_bwd_dq_kernel[(len(plan.tile_seq), hq)](
        q, k, v, do, dq, lse, delta, block_idx, plan.tile_blocks, plan.tile_count, plan.tile_seq,
        plan.tile_start, layout.cu_seqlens_q, layout.cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
        do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), block_idx.stride(0), block_idx.stride(1),
        plan.tile_blocks.stride(0), plan.tile_blocks.stride(1), plan.tile_count.stride(0),
        scale * LOG2E, scale, **shape_args,
    )
    _sparse_bwd_dkdv_kernel[(len(plan.kb_seq), hkv)](
        q, k, v, do, dk, dv, lse, delta, block_idx, plan.kb_tiles, plan.kb_count, plan.kb_seq,
        plan.kb_index, plan.tile_start, layout.cu_seqlens_q, layout.cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
        do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        block_idx.stride(0), block_idx.stride(1), plan.kb_tiles.stride(0), plan.kb_tiles.stride(1),
        plan.kb_count.stride(0), scale * LOG2E, scale, **shape_args,
    )
    return dq, dk, dv


class SparseAttentionFunction(torch.autograd.Function):
    """Block-sparse attention with gradients to q, k, v; the block selection is a constant."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, layout: VarlenLayout, block_size: int, scale: float, block_m: int):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        block_idx = block_idx.contiguous()
        plan = SparsePlan(block_idx, layout, block_m)
        o, lse = _sparse_forward(q, k, v, block_idx, layout, plan, block_size, scale)
        ctx.save_for_backward(q, k, v, o, lse, block_idx)
        ctx.layout, ctx.plan, ctx.block_size, ctx.scale = layout, plan, block_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_idx = ctx.saved_tensors
        dq, dk, dv = _sparse_backward(do, q, k, v, o, lse, block_idx, ctx.layout, ctx.plan, ctx.block_size,
                                      ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def sparse_attention(q, k, v, block_idx, layout: VarlenLayout, block_size: int, scale: float | None = None,
                     block_m: int = 64) -> torch.Tensor:
    """Packed q [Nq, Hq, D], k/v [Nk, Hkv, D], block_idx [Hkv, Nq, topk] -> out [Nq, Hq, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return SparseAttentionFunction.apply(q, k, v, block_idx, layout, block_size, scale, block_m)
