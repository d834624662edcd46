"""InfLLM v2 stage 1 in Triton: compressed keys, the softmax normaliser, and fused block selection.

Three kernels, launched in order by `select_blocks`:
1. `_compress_keys_kernel` mean-pools keys over windows of kernel_size tokens every kernel_stride tokens; it
   runs twice with the coarse normaliser, once for the scored kernels and once for the coarse keys.
2. `_log_normaliser_kernel` gives, per query head, the log-sum-exp of the query against its visible coarse
   keys (normaliser="coarse") or its visible kernels (normaliser="exact").
3. `_select_kernel` does the rest per tile of queries and kv head, with nothing of size [Nq, n_blocks] ever
   written to memory: for each chunk of KB blocks it computes the group-summed probabilities of the
   `pool_kernels` kernels overlapping each block, max-pools them onto the blocks, forces the init and local
   blocks, and merges the chunk into a running top-KB list with tl.topk. Each candidate is one integer,
   (score bits + 1) << 16 | (0xFFFF - block): non-negative floats order like their bits, so the integer order
   is the score order with ties to the lower block, and 0 marks a non-causal block.
Memory is the compressed keys, the log-sum-exp [Hq, Nq] and the result [Hkv, Nq, budget]
(`selection_memory_bytes`). The selection is never differentiated (as in the report): no autograd here.
Reference: `reference.block_scores_ref` / `select_blocks_ref`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .config import SparseConfig
from .layout import VarlenLayout
from .triton_ops import (
    INTERPRETED,
    autotune,
    configs,
    load_rows,
    mma,
    query_tile,
    round_to_bf16,
    sequence_bounds,
)

LOG2E = 1.4426950408889634
BLOCK_ID_BITS = 16  # blocks per sequence < 65536: 4 M tokens at block_size 64
SELECT_BLOCK_M = 32  # query rows per selection program (their tile tables come from the layout)


def _compress_shared(meta) -> int:
    return 0  # loads and a float32 accumulator only: no tl.dot, nothing staged in shared memory


def _log_normaliser_shared(meta) -> int:
    # The q tile, and num_stages buffers of the key tile feeding tl.dot, at the element size of the keys.
    return 2 * (meta["BLOCK_M"] + meta["num_stages"] * meta["BLOCK_C"]) * meta["D"]


def _select_shared(meta) -> int:
    # The operands of tl.dot: the q tile and one kernel tile per chunk of KB blocks (the topk merge stays in
    # registers).
    return 2 * (meta["BLOCK_M"] + meta["KB"]) * meta["D"]


COMPRESS_CONFIGS = configs([{"BLOCK_C": 32}, {"BLOCK_C": 64}], warps=(4,), stages=(1,))
LOG_NORMALISER_CONFIGS = configs([{"BLOCK_C": 64}, {"BLOCK_C": 128}], warps=(4, 8), stages=(2,))
# 8 warps: with 4, the scores, the running top list and the merge spill registers at head dim 128.
SELECT_CONFIGS = configs([{}], warps=(8,), stages=(1, 2))


@autotune(COMPRESS_CONFIGS, key=["KERNEL", "STRIDE", "D"], shared_estimate=_compress_shared)
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
    valid = j < n_kernels
    acc = tl.zeros([BLOCK_C, D], dtype=tl.float32)
    for t in range(KERNEL):
        acc += load_rows(K, k_start, j * STRIDE + t, valid, h, stride_kn, stride_kh, D)
    mean = acc / KERNEL
    if CK.dtype.element_ty == tl.bfloat16:
        mean = round_to_bf16(mean)  # so that the cast below is exact on the interpreter too
    d = tl.arange(0, D)
    tl.store(CK + (c_start + j)[:, None] * stride_cn + h * stride_ch + d[None, :], mean.to(CK.dtype.element_ty),
             mask=valid[:, None])


@autotune(LOG_NORMALISER_CONFIGS, key=["GROUP", "KERNEL", "STRIDE", "D", "BLOCK_M"],
          shared_estimate=_log_normaliser_shared)
@triton.jit
def _log_normaliser_kernel(
    Q, CK, LSE, tile_seq, tile_start, cu_seqlens_q, cu_seqlens_k, cu_seqlens_c,
    stride_qn, stride_qh, stride_cn, stride_ch, stride_lh, qk_scale,
    GROUP: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Base-2 log-sum-exp of q.key * scale over the keys visible to each query; +inf where none is."""
    tile, h = tl.program_id(0), tl.program_id(1)
    g = h // GROUP
    seq = tl.load(tile_seq + tile)
    q_start, seqlen_q, _, seqlen_k = sequence_bounds(cu_seqlens_q, cu_seqlens_k, seq)
    rows, row_ok, pos = query_tile(tile_start, tile, seqlen_q, seqlen_k, BLOCK_M)
    c_start = tl.load(cu_seqlens_c + seq)
    n_keys = tl.load(cu_seqlens_c + seq + 1) - c_start
    q = load_rows(Q, q_start, rows, row_ok, h, stride_qn, stride_qh, D)
    last_pos = tl.max(tl.where(row_ok, pos, 0))
    hi = tl.minimum(tl.where(last_pos >= KERNEL - 1, (last_pos - KERNEL + 1) // STRIDE + 1, 0), n_keys)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, hi, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        ck = load_rows(CK, c_start, j, j < n_keys, g, stride_cn, stride_ch, D)
        visible = (j[None, :] * STRIDE + KERNEL - 1) <= pos[:, None]
        s = tl.where(visible, mma(q, tl.trans(ck)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # +inf makes every probability of a query that sees no key yet exactly 0.
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.store(LSE + h * stride_lh + q_start + rows, lse, mask=row_ok)


@triton.jit
def _rank_keys(score, blocks, valid, EXACT: tl.constexpr):
    """One sortable integer per candidate: score order, ties to the lower block, 0 for invalid candidates."""
    bits = score.to(tl.int32, bitcast=True)
    if EXACT:
        keys = ((bits.to(tl.int64) + 1) << 16) | (0xFFFF - blocks)
    else:
        keys = (((bits >> 16) + 1) << 16) | (0xFFFF - blocks)  # bfloat16 scores: the low 16 bits are zero
    return tl.where(valid, keys, 0)


@triton.jit
def _merge_top(top, keys, BITONIC: tl.constexpr):
    """The KB largest of top [M, KB] and keys [M, KB], largest first (keys of a row are distinct or 0).

    BITONIC: tl.topk's bitonic network, the GPU's way. Otherwise KB rounds of argmax: the same result, and
    what the interpreter runs, whose bitonic network (a Python-level reduction per swap) is ~100x slower.
    """
    M: tl.constexpr = top.shape[0]
    KB: tl.constexpr = top.shape[1]
    both = tl.reshape(tl.join(top, keys), [M, 2 * KB])
    if BITONIC:
        merged = tl.topk(both, KB)
    else:
        col = tl.arange(0, 2 * KB)[None, :]
        slot = tl.arange(0, KB)[None, :]
        merged = tl.zeros_like(top)
        for r in tl.static_range(KB):
            arg = tl.argmax(both, 1, tie_break_left=True)
            merged = tl.where(slot == r, tl.max(both, 1)[:, None], merged)
            both = tl.where(col == arg[:, None], -1, both)
    return merged


@autotune(SELECT_CONFIGS, key=["GROUP", "KERNEL", "STRIDE", "BLOCK_SIZE", "D", "BLOCK_M", "KB", "EXACT"],
          shared_estimate=_select_shared)
@triton.jit
def _select_kernel(
    Q, CK, LSE, IDX, tile_seq, tile_start, cu_seqlens_q, cu_seqlens_k, cu_seqlens_c,
    stride_qn, stride_qh, stride_cn, stride_ch, stride_lh, stride_ih, stride_in, qk_scale,
    GROUP: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    POOL: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, BUDGET: tl.constexpr,
    EXACT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, KB: tl.constexpr,
):
    tile, g = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tile_seq + tile)
    q_start, seqlen_q, _, seqlen_k = sequence_bounds(cu_seqlens_q, cu_seqlens_k, seq)
    rows, row_ok, pos = query_tile(tile_start, tile, seqlen_q, seqlen_k, BLOCK_M)
    c_start = tl.load(cu_seqlens_c + seq)
    n_kernels = tl.load(cu_seqlens_c + seq + 1) - c_start
    q_block = pos // BLOCK_SIZE
    last_block = tl.max(tl.where(row_ok, q_block, 0))

    if EXACT:
        top = tl.zeros([BLOCK_M, KB], dtype=tl.int64)
    else:
        top = tl.zeros([BLOCK_M, KB], dtype=tl.int32)
    for b0 in range(0, last_block + 1, KB):
        b = b0 + tl.arange(0, KB)
        # Invisible kernels count as 0, so a block's score is the max over its visible kernels, or 0.
        best = tl.zeros([BLOCK_M, KB], dtype=tl.float32)
        for o in tl.static_range(POOL):
            # Kernel o of block b: the first kernel overlapping b starts KERNEL - STRIDE tokens before it.
            j = b * (BLOCK_SIZE // STRIDE) - (KERNEL // STRIDE - 1) + o
            j_ok = (j >= 0) & (j < n_kernels)
            ck = load_rows(CK, c_start, j, j_ok, g, stride_cn, stride_ch, D)
            prob = tl.zeros([BLOCK_M, KB], dtype=tl.float32)
            for hh in range(GROUP):
                h = g * GROUP + hh
                q = load_rows(Q, q_start, rows, row_ok, h, stride_qn, stride_qh, D)
                lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=row_ok, other=float("inf"))
                prob += tl.exp2(mma(q, tl.trans(ck)) * qk_scale - lse[:, None])
            if not EXACT:
                prob = round_to_bf16(prob)  # the released kernels store group sums in bfloat16
            visible = j_ok[None, :] & ((j[None, :] * STRIDE + KERNEL - 1) <= pos[:, None])
            best = tl.maximum(best, tl.where(visible, prob, 0.0))
        causal = (b[None, :] <= q_block[:, None]) & row_ok[:, None]
        forced = (b[None, :] < INIT_BLOCKS) | (b[None, :] >= q_block[:, None] - LOCAL_BLOCKS)
        keys = _rank_keys(tl.where(forced, float("inf"), best), b[None, :], causal, EXACT)
        top = _merge_top(top, keys, not INTERPRETED)
    chosen = tl.where(top > 0, 0xFFFF - (top & 0xFFFF), -1).to(tl.int32)
    slot = tl.arange(0, KB)
    tl.store(IDX + g * stride_ih + (q_start + rows)[:, None] * stride_in + slot[None, :], chosen,
             mask=row_ok[:, None] & (slot < BUDGET)[None, :])


def kernel_counts(layout: VarlenLayout, kernel_size: int, stride: int) -> list[int]:
    return [0 if tk < kernel_size else (tk - kernel_size) // stride + 1 for tk in layout.seqlens_k]


def compress_keys(k: torch.Tensor, layout: VarlenLayout, kernel_size: int, stride: int):
    """Mean-pooled keys [Nc, Hkv, D] in k's dtype, and their cu_seqlens."""
    counts = kernel_counts(layout, kernel_size, stride)
    cu_c = torch.zeros(len(counts) + 1, dtype=torch.int32)
    cu_c[1:] = torch.cumsum(torch.tensor(counts), 0)
    cu_c = cu_c.to(k.device)
    hkv, d = k.shape[1], k.shape[2]
    ck = torch.empty(sum(counts), hkv, d, dtype=k.dtype, device=k.device)
    if max(counts) > 0:
        _compress_keys_kernel[lambda meta: (triton.cdiv(max(counts), meta["BLOCK_C"]), hkv, len(counts))](
            k, ck, layout.cu_seqlens_k, cu_c, k.stride(0), k.stride(1), ck.stride(0), ck.stride(1),
            KERNEL=kernel_size, STRIDE=stride, D=d,
        )
    return ck, cu_c


def log_normaliser(q, keys, cu_keys, layout: VarlenLayout, kernel_size: int, stride: int, group: int,
                   qk_scale: float) -> torch.Tensor:
    """[Hq, Nq] float32 base-2 log-sum-exp of q against its visible `keys` (made with kernel_size, stride)."""
    nq, hq, d = q.shape
    tile_seq, tile_start = layout.query_tiles(SELECT_BLOCK_M)
    lse = torch.empty(hq, nq, dtype=torch.float32, device=q.device)
    _log_normaliser_kernel[(len(tile_seq), hq)](
        q, keys, lse, tile_seq, tile_start, layout.cu_seqlens_q, layout.cu_seqlens_k, cu_keys,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), lse.stride(0), qk_scale,
        GROUP=group, KERNEL=kernel_size, STRIDE=stride, D=d, BLOCK_M=SELECT_BLOCK_M,
    )
    return lse


def candidates_per_merge(cfg: SparseConfig) -> int:
    """KB: width of the running top list and of each chunk of blocks (a power of two, >= 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(cfg.budget))


def select_blocks(q, k, layout: VarlenLayout, cfg: SparseConfig, scale: float | None = None) -> torch.Tensor:
    """Stage 1 end to end on packed q [Nq, Hq, D], k [Nk, Hkv, D]: [Hkv, Nq, budget] int32 block ids.

    Per query: the forced blocks in block order, then the best scored blocks, -1 padded.
    """
    if layout.max_blocks >= 1 << BLOCK_ID_BITS:
        raise ValueError(f"a sequence of {layout.max_blocks} blocks: selection handles < {1 << BLOCK_ID_BITS}")
    q, k = q.contiguous(), k.contiguous()  # rows of head_dim contiguous elements
    nq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    qk_scale = (1.0 / math.sqrt(d) if scale is None else scale) * LOG2E
    with torch.no_grad():
        ck, cu_c = compress_keys(k, layout, cfg.kernel_size, cfg.kernel_stride)
        if cfg.normaliser == "coarse":
            coarse, cu_coarse = compress_keys(k, layout, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
            lse = log_normaliser(q, coarse, cu_coarse, layout, cfg.coarse_kernel_size, cfg.coarse_kernel_stride,
                                 group, qk_scale)
            del coarse
        else:
            lse = log_normaliser(q, ck, cu_c, layout, cfg.kernel_size, cfg.kernel_stride, group, qk_scale)
        tile_seq, tile_start = layout.query_tiles(SELECT_BLOCK_M)
        idx = torch.empty(hkv, nq, cfg.budget, dtype=torch.int32, device=q.device)
        _select_kernel[(len(tile_seq), hkv)](
            q, ck, lse, idx, tile_seq, tile_start, layout.cu_seqlens_q, layout.cu_seqlens_k, cu_c,
            q.stride(0), q.stride(1), ck.stride(0), ck.stride(1), lse.stride(0), idx.stride(0), idx.stride(1),
            qk_scale, GROUP=group, KERNEL=cfg.kernel_size, STRIDE=cfg.kernel_stride, BLOCK_SIZE=cfg.block_size,
            POOL=cfg.pool_kernels, INIT_BLOCKS=cfg.init_blocks, LOCAL_BLOCKS=cfg.local_blocks, BUDGET=cfg.budget,
            EXACT=cfg.normaliser == "exact", D=d, BLOCK_M=SELECT_BLOCK_M, KB=candidates_per_merge(cfg),
        )
        return idx


def selection_memory_bytes(seqlens_q: list[int], seqlens_k: list[int], hq: int, hkv: int, head_dim: int,
                           cfg: SparseConfig, key_bytes: int = 2) -> int:
    """Bytes `select_blocks` allocates on the device, from shapes.

    Compressed keys (and the coarse ones) in k's dtype, the float32 log-sum-exp [Hq, Nq], the int32 result
    [Hkv, Nq, budget], and the query-tile tables. No [Nq, n_blocks] buffer exists.
    """
    nq = sum(seqlens_q)
    per_key = hkv * head_dim * key_bytes

    def kernels(size: int, stride: int) -> int:
        return sum(0 if tk < size else (tk - size) // stride + 1 for tk in seqlens_k)

    total = kernels(cfg.kernel_size, cfg.kernel_stride) * per_key + hq * nq * 4 + hkv * nq * cfg.budget * 4
    if cfg.normaliser == "coarse":
        total += kernels(cfg.coarse_kernel_size, cfg.coarse_kernel_stride) * per_key
    tiles = sum(-(-tq // SELECT_BLOCK_M) for tq in seqlens_q)
    cu_seqlens = (len(seqlens_k) + 1) * 4 * (2 if cfg.normaliser == "coarse" else 1)
    return total + tiles * 2 * 4 + cu_seqlens
