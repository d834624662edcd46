"""Our InfLLM v2 selection against the released rules, emulated here from ../shared/REFERENCE.md ("InfLLM v2").

The emulation shares no code with kernels/: it follows the reference text step by step, with the operators the
text names (mean pooling, max-pool kernel 5 / stride 4 / padding 1, a top-k of topk + window_size // block_size
ids). Where the text is silent it takes our documented choice: equal scores go to the lower block index.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, so CPU tensors run the kernels

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels.infllmv2 import select_blocks_varlen
from kernels.infllmv2.config import SparseConfig
from kernels.infllmv2.layout import VarlenLayout
from kernels.infllmv2.selection import select_blocks, selection_memory_bytes

RELEASED = {"block_size": 64, "dense_len": 8192, "init_blocks": 1, "kernel_size": 32, "kernel_stride": 16,
            "topk": 64, "use_nope": False, "window_size": 2048}  # MiniCPM4-8B config.json, sparse_config
TINY = {**RELEASED, "block_size": 16, "kernel_size": 8, "kernel_stride": 4, "window_size": 32, "topk": 6,
        "dense_len": 0}


def released_selection(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, sc: dict) -> list[set[int]]:
    """The block ids the released rules pick, one set per (kv head, query row): sets[h][i].

    q [R, Hq, D]: the queries at `positions` (ints) of one sequence whose keys are k [T, Hkv, D].
    """
    bs, ks, st, window = sc["block_size"], sc["kernel_size"], sc["kernel_stride"], sc["window_size"]
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    group = hq // hkv

    def mean_pool(size, stride):  # [Hkv, n, D] compressed keys, in k's dtype
        return F.avg_pool1d(k.float().permute(1, 2, 0), size, stride).to(k.dtype).float().transpose(1, 2)

    semantic = mean_pool(ks, st)  # "kernels of 32 tokens with stride 16"
    coarse = mean_pool(4 * ks, 4 * st)  # "coarser keys (kernel 128, stride 64)"
    pos = positions.long()[:, None]
    n_blocks = math.ceil(k.shape[0] / bs)
    local = window // bs
    budget = sc["topk"] + local
    picked = []
    for h in range(hkv):
        heads = slice(h * group, (h + 1) * group)
        qh = q[:, heads].float().transpose(0, 1)  # [group, R, D]
        logits = qh @ semantic[h].T / math.sqrt(d)
        coarse_logits = qh @ coarse[h].T / math.sqrt(d)
        seen = torch.arange(semantic.shape[1]) * st + ks - 1 <= pos  # "visible when 16j + 31 <= p"
        coarse_seen = torch.arange(coarse.shape[1]) * 4 * st + 4 * ks - 1 <= pos  # "64c + 127 <= p"
        normaliser = torch.logsumexp(coarse_logits.masked_fill(~coarse_seen, -math.inf), -1, keepdim=True)
        # A query that sees no coarse key yet (p < 127) has all its causal blocks forced: its scores don't count.
        probs = torch.where(seen, torch.exp(logits - normaliser), 0.0)
        summed = probs.sum(0).to(torch.bfloat16)  # "summed over the query heads of a GQA group, stored in bf16"
        # "max-pool, kernel 5, stride 4, padding 1; invisible kernels count as 0" (zeros are already there)
        pooled = F.max_pool1d(summed.float()[:, None], bs // st + ks // st - 1, bs // st, ks // st - 1)[:, 0]
        scores = F.pad(pooled, (0, n_blocks - pooled.shape[1]))
        b = torch.arange(n_blocks)
        qb = pos // bs
        forced = (b < sc["init_blocks"]) | ((qb - local <= b) & (b <= qb))
        scores = torch.where(forced, math.inf, scores).masked_fill(b > qb, -math.inf)  # future blocks never
        order = torch.sort(scores, dim=-1, descending=True, stable=True)  # equal scores: lower block first
        picked.append([{int(i) for i, s in zip(idx[:budget], val[:budget]) if s > -math.inf}
                       for idx, val in zip(order.indices, order.values)])
    return picked


def as_sets(chosen: torch.Tensor) -> list[list[set[int]]]:
    return [[{int(i) for i in row if i >= 0} for row in head] for head in chosen]


def random_sequence(length, hq, hkv, d, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(length, hq, d, generator=gen).to(dtype)
    # Keys with a per-block offset, so that blocks really differ and the top-k is not decided by noise alone.
    offsets = torch.randn(-(-length // 16), hkv, d, generator=gen).repeat_interleave(16, 0)[:length]
    return q, (torch.randn(length, hkv, d, generator=gen) + offsets).to(dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("length", "hq", "hkv", "dtype"),
                         [(300, 4, 2, torch.float32), (211, 8, 1, torch.bfloat16)])
def test_selection_equals_the_released_rules(backend, length, hq, hkv, dtype):
    q, k = random_sequence(length, hq, hkv, 16, seed=length, dtype=dtype)
    cu = torch.tensor([0, length], dtype=torch.int32)
    chosen = select_blocks_varlen(q, k, cu, cu, TINY, backend=backend)
    assert chosen.shape == (hkv, length, 6 + 2)
    assert as_sets(chosen) == released_selection(q, k, torch.arange(length), TINY)


def test_released_config_at_16k_tokens_gives_96_ids_with_init_and_33_local_blocks():
    length = 16384
    q, k = random_sequence(length, 2, 1, 16, seed=16)
    cu = torch.tensor([0, length], dtype=torch.int32)
    chosen = select_blocks_varlen(q, k, cu, cu, RELEASED, backend="torch")
    assert chosen.shape == (1, length, 96)
    positions = torch.arange(length)
    q_block = positions // 64
    valid = (chosen[0] >= 0).sum(1)
    assert torch.equal(valid, torch.clamp(q_block + 1, max=96))  # 96 ids once 96 blocks are causal
    last = set(chosen[0, -1].tolist())
    assert len(last) == 96 and 0 in last and set(range(255 - 32, 256)) <= last  # init + 33 local blocks
    assert len(last - {0, *range(223, 256)}) == 62  # and 62 chosen by score
    rows = torch.cat([torch.arange(0, length, 509), torch.arange(length - 64, length)])
    assert as_sets(chosen[:, rows]) == released_selection(q[rows], k, rows, RELEASED)


class _Allocations(TorchDispatchMode):
    """Bytes of every tensor storage created while active (inputs' storages excluded)."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("normaliser", ["coarse", "exact"])
def test_selection_memory_formula_matches_the_allocations(normaliser):
    cfg = SparseConfig(**{**TINY, "normaliser": normaliser})
    lens = [300, 37]
    cu = torch.tensor([0, 300, 337], dtype=torch.int32)
    q, k = torch.randn(337, 4, 16), torch.randn(337, 2, 16)
    layout = VarlenLayout(cu, cu, cfg.block_size)
    with _Allocations() as allocations:
        chosen = select_blocks(q, k, layout, cfg)
    formula = selection_memory_bytes(lens, lens, 4, 2, 16, cfg, key_bytes=4)
    # Allocations miss the tile tables (made from Python lists) and count the host-side cumsum temporaries of
    # cu_seqlens: a few bytes per sequence and per tile. Every buffer of the formula is over 5% of the total.
    assert sum(allocations.sizes.values()) == pytest.approx(formula, rel=0.01)
    assert max(allocations.sizes.values()) == chosen.nbytes  # nothing as large as [Nq, n_blocks] scores
