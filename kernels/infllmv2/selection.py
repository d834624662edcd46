"""InfLLM v2 stage 1 in Triton: compressed keys, block scores, top-k block selection.

Three kernels, launched in order by `select_blocks`:
1. `_compress_keys_kernel` mean-pools keys over windows of kernel_size tokens every kernel_stride tokens.
2. `_kernel_lse_kernel` gives, per query head, the log-sum-exp of the query against its visible compressed
   keys; `_block_score_kernel` then turns logits into probabilities, sums them over the GQA group and
   max-pools them onto blocks in one pass. Pooling is fused by computing, for each block, the logits of the
   `pool_kernels` kernels overlapping it, so no [Nq, n_kernels] score matrix is ever written.
3. `_topk_kernel` forces the initial and local-window blocks to +inf and extracts the top-k by repeated
   argmax (ties to the lower index, like a stable sort), writing -1 when fewer blocks are causal.
The selection is never differentiated (as in the report), so there is no autograd Function here.
Reference: `reference.block_scores_ref` / `select_blocks_ref`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .config import SparseConfig
from .layout import VarlenLayout
from .triton_ops import mma

LOG2E = 1.4426950408889634


@triton.jit
def _compress_keys_kernel(
    K, CK, cu_seqlens_k, cu_seqlens_c,
    stride_kn, stride_kh, stride_cn, stride_ch,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c, h, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_start = tl.load(cu_seqlens_k + seq)
    c_start = tl.load(cu_seqlens_c + seq)
    n_kernels = tl.load(cu_seqlens_c + seq + 1) - c_start
    j = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, D)
    valid = (j < n_kernels)[:, None]
    acc = tl.zeros([BLOCK_C, D], dtype=tl.float32)
    for t in range(KERNEL):
        rows = k_start + j * STRIDE + t
        acc += tl.load(K + rows[:, None] * stride_kn + h * stride_kh + d[None, :], mask=valid, other=0.0)
    out = (acc / KERNEL).to(CK.dtype.element_ty)
    tl.store(CK + (c_start + j)[:, None] * stride_cn + h * stride_ch + d[None, :], out, mask=valid)


@triton.jit
def _kernel_lse_kernel(
    Q, CK, LSE, tile_seq, tile_start, cu_seqlens_q, cu_seqlens_k, cu_seqlens_c,
    stride_qn, stride_qh, stride_cn, stride_ch, stride_lh, qk_scale,
    GROUP: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile, h = tl.program_id(0), tl.program_id(1)
    g = h // GROUP
    seq = tl.load(tile_seq + tile)
    m0 = tl.load(tile_start + tile)
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - tl.load(cu_seqlens_k + seq)
    c_start = tl.load(cu_seqlens_c + seq)
    n_kernels = tl.load(cu_seqlens_c + seq + 1) - c_start

    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    pos = seqlen_k - seqlen_q + rows
    d = tl.arange(0, D)
    q = tl.load(Q + (q_start + rows)[:, None] * stride_qn + h * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    last_pos = seqlen_k - seqlen_q + tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    hi = tl.where(last_pos >= KERNEL - 1, (last_pos - KERNEL + 1) // STRIDE + 1, 0)
    hi = tl.minimum(hi, n_kernels)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, hi, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        ck = tl.load(CK + (c_start + j)[:, None] * stride_cn + g * stride_ch + d[None, :],
                     mask=(j < n_kernels)[:, None], other=0.0)
        s = mma(q, tl.trans(ck)) * qk_scale
        visible = (j[None, :] * STRIDE + KERNEL - 1) <= pos[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # +inf makes every probability of a query that sees no whole kernel yet exactly 0.
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.store(LSE + h * stride_lh + q_start + rows, lse, mask=row_ok)


@triton.jit
def _block_score_kernel(
    Q, CK, LSE, SCORE, tile_seq, tile_start, cu_seqlens_q, cu_seqlens_k, cu_seqlens_c,
    stride_qn, stride_qh, stride_cn, stride_ch, stride_lh, stride_sh, stride_sn, qk_scale,
    GROUP: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    POOL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):
    tile, g = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tile_seq + tile)
    m0 = tl.load(tile_start + tile)
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - tl.load(cu_seqlens_k + seq)
    c_start = tl.load(cu_seqlens_c + seq)
    n_kernels = tl.load(cu_seqlens_c + seq + 1) - c_start
    n_blocks = (seqlen_k + BLOCK_SIZE - 1) // BLOCK_SIZE

    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    pos = seqlen_k - seqlen_q + rows
    d = tl.arange(0, D)
    last_pos = seqlen_k - seqlen_q + tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    for b0 in range(0, last_pos // BLOCK_SIZE + 1, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        best = tl.full([BLOCK_M, BLOCK_B], float("-inf"), dtype=tl.float32)
        for o in tl.static_range(POOL):
            # Kernel o of block b: the first kernel overlapping b starts KERNEL - STRIDE tokens before it.
            j = b * (BLOCK_SIZE // STRIDE) - (KERNEL // STRIDE - 1) + o
            j_ok = (j >= 0) & (j < n_kernels)
            ck = tl.load(CK + (c_start + j)[:, None] * stride_cn + g * stride_ch + d[None, :],
                         mask=j_ok[:, None], other=0.0)
            prob = tl.zeros([BLOCK_M, BLOCK_B], dtype=tl.float32)
            for hh in range(GROUP):
                h = g * GROUP + hh
                q = tl.load(Q + (q_start + rows)[:, None] * stride_qn + h * stride_qh + d[None, :],
                            mask=row_ok[:, None], other=0.0)
                lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=row_ok, other=float("inf"))
                prob += tl.exp2(mma(q, tl.trans(ck)) * qk_scale - lse[:, None])
            visible = j_ok[None, :] & ((j[None, :] * STRIDE + KERNEL - 1) <= pos[:, None])
            best = tl.maximum(best, tl.where(visible, prob, float("-inf")))
        tl.store(SCORE + g * stride_sh + (q_start + rows)[:, None] * stride_sn + b[None, :], best,
                 mask=row_ok[:, None] & (b < n_blocks)[None, :])


@triton.jit
def _topk_kernel(
    SCORE, IDX, POS, num_queries, max_blocks,
    stride_sh, stride_sn, stride_ih, stride_in,
    BLOCK_SIZE: tl.constexpr, INIT_BLOCKS: tl.constexpr, WINDOW: tl.constexpr,
    TOPK: tl.constexpr, BLOCKS_P2: tl.constexpr, ROWS: tl.constexpr,
):
    r0, g = tl.program_id(0) * ROWS, tl.program_id(1)
    rows = r0 + tl.arange(0, ROWS)
    row_ok = rows < num_queries
    pos = tl.load(POS + rows, mask=row_ok, other=0)
    b = tl.arange(0, BLOCKS_P2)
    causal = (b[None, :] * BLOCK_SIZE <= pos[:, None]) & (b[None, :] < max_blocks) & row_ok[:, None]
    vals = tl.load(SCORE + g * stride_sh + rows[:, None] * stride_sn + b[None, :], mask=causal,
                   other=float("-inf"))
    window_first = tl.maximum(pos - WINDOW + 1, 0) // BLOCK_SIZE
    forced = causal & ((b[None, :] < INIT_BLOCKS) | (b[None, :] >= window_first[:, None]))
    vals = tl.where(forced, float("inf"), vals)
    for r in range(TOPK):
        best = tl.max(vals, 1)
        arg = tl.argmax(vals, 1, tie_break_left=True)
        tl.store(IDX + g * stride_ih + rows * stride_in + r, tl.where(best > float("-inf"), arg, -1),
                 mask=row_ok)
        vals = tl.where(b[None, :] == arg[:, None], float("-inf"), vals)


def compress_keys(k: torch.Tensor, layout: VarlenLayout, cfg: SparseConfig, block_c: int = 64):
    """Mean-pooled keys [Nc, Hkv, D] in k's dtype, and their cu_seqlens."""
    counts = [0 if tk < cfg.kernel_size else (tk - cfg.kernel_size) // cfg.kernel_stride + 1
              for tk in layout.seqlens_k]
    cu_c = torch.zeros(len(counts) + 1, dtype=torch.int32)
    cu_c[1:] = torch.cumsum(torch.tensor(counts), 0)
    cu_c = cu_c.to(k.device)
    hkv, d = k.shape[1], k.shape[2]
    ck = torch.empty(int(cu_c[-1]), hkv, d, dtype=k.dtype, device=k.device)
    if max(counts) > 0:
        grid = (triton.cdiv(max(counts), block_c), hkv, len(counts))
        _compress_keys_kernel[grid](
            k, ck, layout.cu_seqlens_k, cu_c, k.stride(0), k.stride(1), ck.stride(0), ck.stride(1),
            KERNEL=cfg.kernel_size, STRIDE=cfg.kernel_stride, D=d, BLOCK_C=block_c,
        )
    return ck, cu_c


def block_scores(q, k, layout: VarlenLayout, cfg: SparseConfig, scale: float | None = None,
                 block_m: int = 64, block_c: int = 64, block_b: int = 16) -> torch.Tensor:
    """Stage-1 block scores [Hkv, Nq, max blocks] float32, -inf where no visible kernel overlaps."""
    nq, hq, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ck, cu_c = compress_keys(k, layout, cfg, block_c)
    tile_seq, tile_start, _ = layout.query_tiles(block_m)
    lse = torch.empty(hq, nq, dtype=torch.float32, device=q.device)
    scores = torch.full((hkv, nq, layout.max_blocks), -math.inf, dtype=torch.float32, device=q.device)
    common = (tile_seq, tile_start, layout.cu_seqlens_q, layout.cu_seqlens_k, cu_c,
              q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), lse.stride(0))
    _kernel_lse_kernel[(len(tile_seq), hq)](
        q, ck, lse, *common, scale * LOG2E, GROUP=hq // hkv, KERNEL=cfg.kernel_size,
        STRIDE=cfg.kernel_stride, D=d, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    _block_score_kernel[(len(tile_seq), hkv)](
        q, ck, lse, scores, *common, scores.stride(0), scores.stride(1), scale * LOG2E,
        GROUP=hq // hkv, KERNEL=cfg.kernel_size, STRIDE=cfg.kernel_stride, BLOCK_SIZE=cfg.block_size,
        POOL=cfg.pool_kernels, D=d, BLOCK_M=block_m, BLOCK_B=block_b,
    )
    return scores


def topk_blocks(scores: torch.Tensor, layout: VarlenLayout, cfg: SparseConfig, rows: int = 4) -> torch.Tensor:
    """Top-k block indices [Hkv, Nq, topk] int32 from block scores, best first, -1 padded."""
    hkv, nq, max_blocks = scores.shape
    idx = torch.empty(hkv, nq, cfg.topk, dtype=torch.int32, device=scores.device)
    _topk_kernel[(triton.cdiv(nq, rows), hkv)](
        scores, idx, layout.positions, nq, max_blocks,
        scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1),
        BLOCK_SIZE=cfg.block_size, INIT_BLOCKS=cfg.init_blocks, WINDOW=cfg.window_size, TOPK=cfg.topk,
        BLOCKS_P2=triton.next_power_of_2(max_blocks), ROWS=rows,
    )
    return idx


def select_blocks(q, k, layout: VarlenLayout, cfg: SparseConfig, scale: float | None = None,
                  block_m: int = 64) -> torch.Tensor:
    """Stage 1 end to end on packed q [Nq, Hq, D], k [Nk, Hkv, D]: [Hkv, Nq, topk] int32."""
    with torch.no_grad():
        return topk_blocks(block_scores(q, k, layout, cfg, scale, block_m=block_m), layout, cfg)
