"""Plain PyTorch InfLLM v2: the test oracle for the Triton kernels and the CPU path of the model.

Layout is the packed (varlen) one of flash-attn: q [Nq, Hq, D], k/v [Nk, Hkv, D], sequence s owning rows
cu_seqlens[s]:cu_seqlens[s+1]. The queries of a sequence are the LAST Tq of its Tk keys, so query i sits at
position Tk - Tq + i. Everything is computed in float32 one sequence (and one chunk of queries) at a time.

Stage 1, as the released kernels do it (sizes for the released sparse_config in brackets):
- compressed key j = mean of keys [j*stride, j*stride + kernel_size) [32, 16]; only whole kernels exist.
  Kernel j is visible to the query at position p when its last token is: j*stride + kernel_size - 1 <= p.
- each query head h scores the visible kernels: prob_j = exp(q.k_j * scale - lse_h), where lse_h is the
  log-sum-exp of q.c * scale over the visible *coarse* keys c (kernel and stride x4: [128, 64]) with
  normaliser="coarse", or over the visible kernels themselves with normaliser="exact". A query that sees no
  key of its normaliser gets prob 0 everywhere (its blocks are all forced anyway, see config.py).
- group score = sum of prob_j over the query heads of the GQA group, stored in bfloat16 with "coarse"
  (float32 with "exact"); invisible kernels score 0.
- block score of block b = max of the group scores of the `pool_kernels` kernels overlapping it
  [kernels 4b-1 .. 4b+3].
- selection: `budget` = topk + window_size // block_size ids per query [96]: first the forced blocks, the init
  blocks b < init_blocks and the local blocks qb - local_blocks <= b <= qb with qb = p // block_size [33], in
  block order, then the other causal blocks by score, ties to the lower block index; -1 pads the tail when
  fewer blocks are causal. Future blocks are never chosen.
"""

from __future__ import annotations

import math

import torch

from .config import SparseConfig

QUERY_CHUNK = 1024  # rows scored at once: bounds the [Hq, rows, kernels] float32 logits of the CPU path


def sequence_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    return torch.diff(cu_seqlens.cpu()).tolist()


def query_positions(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """Position of every packed query row inside its own sequence of keys, [Nq] int32."""
    positions = [
        torch.arange(tk - tq, tk, dtype=torch.int32)
        for tq, tk in zip(sequence_lengths(cu_seqlens_q), sequence_lengths(cu_seqlens_k))
    ]
    return torch.cat(positions).to(cu_seqlens_q.device)


def num_kernels(seqlen_k: int, kernel_size: int, stride: int) -> int:
    return 0 if seqlen_k < kernel_size else (seqlen_k - kernel_size) // stride + 1


def compress_keys_ref(k: torch.Tensor, cu_seqlens_k: torch.Tensor, kernel_size: int, stride: int):
    """Mean-pooled keys [Nc, Hkv, D] (in k's dtype) and their cu_seqlens."""
    pieces, counts = [], []
    for s, tk in enumerate(sequence_lengths(cu_seqlens_k)):
        ks = k[cu_seqlens_k[s] : cu_seqlens_k[s] + tk].float()
        n = num_kernels(tk, kernel_size, stride)
        if n:
            windows = ks.unfold(0, kernel_size, stride)[:n]  # [n, H, D, kernel]
            pieces.append(windows.mean(-1).to(k.dtype))
        counts.append(n)
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(counts), 0)
    empty = k.new_zeros(0, *k.shape[1:])
    return torch.cat([empty, *pieces]), cu.to(k.device)


def _visible(pos: torch.Tensor, n: int, kernel_size: int, stride: int) -> torch.Tensor:
    """[rows, n] bool: kernel j ends at or before the query's position."""
    return (torch.arange(n, device=pos.device) * stride + kernel_size - 1)[None, :] <= pos[:, None]


def _log_normaliser(qs, keys, pos, kernel_size, stride, group, scale):
    """[Hq, rows] log-sum-exp of q.key * scale over the visible keys; +inf where none is visible."""
    visible = _visible(pos, keys.shape[1], kernel_size, stride)
    logits = (qs @ keys.repeat_interleave(group, 0).transpose(1, 2)) * scale
    lse = torch.logsumexp(logits.masked_fill(~visible, -math.inf), -1)
    return torch.where(torch.isfinite(lse), lse, math.inf)


def block_scores_ref(q, k, cu_seqlens_q, cu_seqlens_k, cfg: SparseConfig, scale: float | None = None):
    """Stage-1 block scores [Hkv, Nq, max blocks] float32 (bfloat16 values with the coarse normaliser)."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ck, cu_c = compress_keys_ref(k, cu_seqlens_k, cfg.kernel_size, cfg.kernel_stride)
    coarse = cfg.normaliser == "coarse"
    if coarse:
        ck2, cu_c2 = compress_keys_ref(k, cu_seqlens_k, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    lens_q, lens_k = sequence_lengths(cu_seqlens_q), sequence_lengths(cu_seqlens_k)
    bs, stride = cfg.block_size, cfg.kernel_stride
    max_blocks = max(-(-tk // bs) for tk in lens_k)
    out = torch.zeros((hkv, q.shape[0], max_blocks), dtype=torch.float32, device=q.device)
    for s, (tq, tk) in enumerate(zip(lens_q, lens_k)):
        cs = ck[cu_c[s] : cu_c[s + 1]].float().transpose(0, 1)  # [Hkv, n, D]
        n = cs.shape[1]
        if n == 0:
            continue
        # Kernel o of block b: the first kernel overlapping b starts kernel_size - stride tokens before it.
        nb = -(-tk // bs)
        pooled = torch.arange(nb, device=q.device)[:, None] * (bs // stride) - (cfg.kernel_size // stride - 1)
        pooled = pooled + torch.arange(cfg.pool_kernels, device=q.device)[None, :]  # [nb, pool]
        in_range = (pooled >= 0) & (pooled < n)
        for r0 in range(0, tq, QUERY_CHUNK):
            rows = slice(int(cu_seqlens_q[s]) + r0, int(cu_seqlens_q[s]) + min(r0 + QUERY_CHUNK, tq))
            qs = q[rows].float().transpose(0, 1)  # [Hq, rows, D]
            pos = torch.arange(tk - tq + r0, tk - tq + r0 + qs.shape[1], device=q.device)
            if coarse:
                keys2 = ck2[cu_c2[s] : cu_c2[s + 1]].float().transpose(0, 1)
                lse = _log_normaliser(qs, keys2, pos, cfg.coarse_kernel_size, cfg.coarse_kernel_stride, group,
                                      scale)
            else:
                lse = _log_normaliser(qs, cs, pos, cfg.kernel_size, stride, group, scale)
            logits = (qs @ cs.repeat_interleave(group, 0).transpose(1, 2)) * scale
            visible = _visible(pos, n, cfg.kernel_size, stride)
            probs = torch.where(visible, torch.exp(logits - lse[..., None]), 0.0)
            kernel_scores = probs.view(hkv, group, -1, n).sum(1)  # [Hkv, rows, n]
            if coarse:
                kernel_scores = kernel_scores.to(torch.bfloat16).float()
            gathered = kernel_scores[:, :, pooled.clamp(0, n - 1)].masked_fill(~in_range, 0.0)
            out[:, rows, :nb] = gathered.amax(-1)
    return out


def forced_blocks_mask(positions: torch.Tensor, num_blocks: int, cfg: SparseConfig) -> torch.Tensor:
    """[Nq, num_blocks] bool: the init blocks and the local blocks qb - local_blocks .. qb, all causal."""
    b = torch.arange(num_blocks, device=positions.device)[None, :]
    qb = positions.long()[:, None] // cfg.block_size
    return (b <= qb) & ((b < cfg.init_blocks) | (b >= qb - cfg.local_blocks))


def select_blocks_ref(scores: torch.Tensor, positions: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """The budget's block ids per (kv head, query): forced first, then by score; [Hkv, Nq, budget] int32."""
    hkv, nq, nb = scores.shape
    ranked = scores.masked_fill(forced_blocks_mask(positions, nb, cfg)[None], math.inf)
    causal = torch.arange(nb, device=scores.device)[None, :] <= positions.long()[:, None] // cfg.block_size
    ranked = ranked.masked_fill(~causal[None], -math.inf)
    # A stable descending sort keeps equal scores in block order: ties go to the lower block index.
    values, order = torch.sort(ranked, dim=-1, descending=True, stable=True)
    k = min(cfg.budget, nb)
    chosen = torch.where(values[..., :k] > -math.inf, order[..., :k], -1).to(torch.int32)
    pad = torch.full((hkv, nq, cfg.budget - k), -1, dtype=torch.int32, device=scores.device)
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
        chosen = block_idx[:, rows].long()  # [Hkv, Tq, budget]
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
    """Stage 1 end to end: compressed keys, block scores, selection. Never differentiated."""
    with torch.no_grad():
        scores = block_scores_ref(q, k, cu_seqlens_q, cu_seqlens_k, cfg, scale)
        return select_blocks_ref(scores, query_positions(cu_seqlens_q, cu_seqlens_k), cfg)
