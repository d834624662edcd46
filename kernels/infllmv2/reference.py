"""Plain PyTorch InfLLM v2: the test oracle for the Triton kernels and the CPU path of the model.

Layout is the packed (varlen) one of flash-attn: q [Nq, Hq, D], k/v [Nk, Hkv, D], sequence s owning rows
cu_seqlens[s]:cu_seqlens[s+1]. The queries of a sequence are the LAST Tq of its Tk keys, so query i sits at
position Tk - Tq + i. Everything is computed in float32 one sequence at a time, for clarity over speed.

Definitions shared with the kernels:
- compressed key j = mean of keys [j*stride, j*stride + kernel_size); only whole kernels exist.
- stage-1 score of kernel j for query at position p: softmax over the kernels visible to p (its last token
  <= p) of q.k_j * scale, summed over the query heads of the GQA group.
- block score of block b = max of the stage-1 scores of the visible kernels overlapping b (-inf if none).
- selection: init blocks and the blocks overlapping the window [p - window_size + 1, p] rank first (+inf),
  then by block score; ties go to the lower block index; -inf blocks are never chosen (index -1 pads).
"""

from __future__ import annotations

import math

import torch

from .config import SparseConfig


def sequence_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    return torch.diff(cu_seqlens.cpu()).tolist()


def query_positions(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """Position of every packed query row inside its own sequence of keys, [Nq] int32."""
    positions = [
        torch.arange(tk - tq, tk, dtype=torch.int32)
        for tq, tk in zip(sequence_lengths(cu_seqlens_q), sequence_lengths(cu_seqlens_k))
    ]
    return torch.cat(positions).to(cu_seqlens_q.device)


def num_kernels(seqlen_k: int, cfg: SparseConfig) -> int:
    return 0 if seqlen_k < cfg.kernel_size else (seqlen_k - cfg.kernel_size) // cfg.kernel_stride + 1


def compress_keys_ref(k: torch.Tensor, cu_seqlens_k: torch.Tensor, cfg: SparseConfig):
    """Mean-pooled keys [Nc, Hkv, D] (in k's dtype) and their cu_seqlens."""
    pieces, counts = [], []
    for s, tk in enumerate(sequence_lengths(cu_seqlens_k)):
        ks = k[cu_seqlens_k[s] : cu_seqlens_k[s] + tk].float()
        n = num_kernels(tk, cfg)
        if n:
            windows = ks.unfold(0, cfg.kernel_size, cfg.kernel_stride)[:n]  # [n, H, D, kernel]
            pieces.append(windows.mean(-1).to(k.dtype))
        counts.append(n)
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(counts), 0)
    empty = k.new_zeros(0, *k.shape[1:])
    return torch.cat([empty, *pieces]), cu.to(k.device)


def block_scores_ref(q, k, cu_seqlens_q, cu_seqlens_k, cfg: SparseConfig, scale: float | None = None):
    """Stage-1 block scores [Hkv, Nq, max blocks] float32; -inf where no visible kernel overlaps a block."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ck, cu_c = compress_keys_ref(k, cu_seqlens_k, cfg)
    lens_q, lens_k = sequence_lengths(cu_seqlens_q), sequence_lengths(cu_seqlens_k)
    max_blocks = max(-(-tk // cfg.block_size) for tk in lens_k)
    out = torch.full((hkv, q.shape[0], max_blocks), -math.inf, dtype=torch.float32, device=q.device)
    stride, ksize, bs = cfg.kernel_stride, cfg.kernel_size, cfg.block_size
    for s, (tq, tk) in enumerate(zip(lens_q, lens_k)):
        qs = q[cu_seqlens_q[s] : cu_seqlens_q[s] + tq].float().transpose(0, 1)  # [Hq, Tq, D]
        cs = ck[cu_c[s] : cu_c[s + 1]].float().transpose(0, 1)  # [Hkv, n, D]
        n = cs.shape[1]
        pos = torch.arange(tk - tq, tk, device=q.device)
        kernel_end = torch.arange(n, device=q.device) * stride + ksize - 1
        visible = kernel_end[None, :] <= pos[:, None]  # [Tq, n]
        logits = (qs @ cs.repeat_interleave(hq // hkv, 0).transpose(1, 2)) * scale
        probs = torch.softmax(logits.masked_fill(~visible, -math.inf), -1).nan_to_num(0.0)
        group = probs.view(hkv, hq // hkv, tq, n).sum(1)  # [Hkv, Tq, n]
        nb = -(-tk // bs)
        blocks = torch.full((hkv, tq, nb), -math.inf, device=q.device)
        first = torch.arange(nb, device=q.device) * (bs // stride) - ksize // stride + 1
        for o in range(cfg.pool_kernels if n else 0):
            j = first + o
            jj = j.clamp(0, n - 1)
            cand_visible = ((j >= 0) & (j < n))[None, :] & visible[:, jj]  # [Tq, nb]
            blocks = torch.maximum(blocks, group[:, :, jj].masked_fill(~cand_visible[None], -math.inf))
        out[:, cu_seqlens_q[s] : cu_seqlens_q[s] + tq, :nb] = blocks
    return out


def forced_blocks_mask(positions: torch.Tensor, num_blocks: int, cfg: SparseConfig) -> torch.Tensor:
    """[Nq, num_blocks] bool: initial blocks and blocks overlapping the local window, all causal."""
    b = torch.arange(num_blocks, device=positions.device)[None, :]
    p = positions.long()[:, None]
    window_first = (p - cfg.window_size + 1).clamp(min=0) // cfg.block_size
    causal = b * cfg.block_size <= p
    return causal & ((b < cfg.init_blocks) | (b >= window_first))


def select_blocks_ref(scores: torch.Tensor, positions: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Top-k blocks per (kv head, query), best first, -1 padded: [Hkv, Nq, topk] int32."""
    hkv, nq, nb = scores.shape
    ranked = scores.masked_fill(forced_blocks_mask(positions, nb, cfg)[None], math.inf)
    causal = torch.arange(nb, device=scores.device)[None, :] * cfg.block_size <= positions.long()[:, None]
    ranked = ranked.masked_fill(~causal[None], -math.inf)
    # A stable descending sort keeps equal scores in block order: ties go to the lower block index.
    values, order = torch.sort(ranked, dim=-1, descending=True, stable=True)
    k = min(cfg.topk, nb)
    chosen = torch.where(values[..., :k] > -math.inf, order[..., :k], -1).to(torch.int32)
    pad = torch.full((hkv, nq, cfg.topk - k), -1, dtype=torch.int32, device=scores.device)
    return torch.cat([chosen, pad], -1)


def sparse_attention_ref(q, k, v, block_idx, cu_seqlens_q, cu_seqlens_k, block_size: int, scale=None):
    """Causal attention of each query over its selected blocks only; differentiable in q, k, v."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    outs = []
    for s, (tq, tk) in enumerate(zip(sequence_lengths(cu_seqlens_q), sequence_lengths(cu_seqlens_k))):
        rows = slice(int(cu_seqlens_q[s]), int(cu_seqlens_q[s]) + tq)
        keys = slice(int(cu_seqlens_k[s]), int(cu_seqlens_k[s]) + tk)
        nb = -(-tk // block_size)
        chosen = block_idx[:, rows].long()  # [Hkv, Tq, topk]
        selected = torch.zeros(hkv, tq, nb + 1, dtype=torch.bool, device=q.device)
        selected.scatter_(2, chosen + 1, True)  # slot 0 absorbs the -1 padding
        token_block = torch.arange(tk, device=q.device) // block_size
        allowed = selected[:, :, 1:][:, :, token_block]  # [Hkv, Tq, Tk]
        causal = torch.arange(tk, device=q.device)[None, :] <= torch.arange(tk - tq, tk, device=q.device)[:, None]
        allowed = (allowed & causal).repeat_interleave(hq // hkv, 0)
        qs, ks, vs = (x.float().transpose(0, 1) for x in (q[rows], k[keys], v[keys]))
        ks, vs = ks.repeat_interleave(hq // hkv, 0), vs.repeat_interleave(hq // hkv, 0)
        logits = (qs @ ks.transpose(1, 2)) * scale
        probs = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1)
        outs.append((probs @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(outs)


def select_blocks_full_ref(q, k, cu_seqlens_q, cu_seqlens_k, cfg: SparseConfig, scale=None) -> torch.Tensor:
    """Stage 1 end to end: compressed keys, block scores, top-k. Never differentiated."""
    with torch.no_grad():
        scores = block_scores_ref(q, k, cu_seqlens_q, cu_seqlens_k, cfg, scale)
        return select_blocks_ref(scores, query_positions(cu_seqlens_q, cu_seqlens_k), cfg)
