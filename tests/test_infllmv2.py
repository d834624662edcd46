"""InfLLM v2 kernels against their PyTorch references, hand-computed answers and dense SDPA.

Triton runs on the CPU interpreter here, so shapes are tiny: block 16, kernel 8, stride 4, head dim 16.
Against an emulation of the released selection rules: test_infllmv2_released.py; compiled for GPUs:
test_infllmv2_compile.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, so CPU tensors run the kernels

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.infllmv2 import SparseConfig, infllmv2_attention, infllmv2_attention_varlen, select_blocks_varlen
from kernels.infllmv2 import reference as ref
from kernels.infllmv2.layout import VarlenLayout
from kernels.infllmv2.selection import _merge_top, compress_keys, select_blocks
from kernels.infllmv2.sparse_attention import sparse_attention

# local_blocks = 32 // 16 = 2, so a query's budget is topk + 2 = 8 block ids, 4 of them forced (init + 3 local).
TINY = {"block_size": 16, "kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "window_size": 32, "topk": 6,
        "dense_len": 0}

# (query heads, kv heads, query lengths, key lengths): GQA 1/2/8; lengths off the block grid, a single
# block, a sequence shorter than one kernel, a decode row, and chunked prefill (Tq < Tk).
CASES = {
    "gqa1-varlen-decode": (2, 2, [100, 1, 5], [100, 53, 5]),
    "gqa2-one-block": (4, 2, [16, 9], [16, 9]),
    "gqa8-chunk": (8, 1, [40, 90], [110, 90]),
    "gqa3-padded-heads": (6, 2, [70], [70]),  # stage-2 tiles pad the group of 3 heads to 4 rows per token
}


def make_batch(case, dtype=torch.float32, seed=0):
    hq, hkv, lens_q, lens_k = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), hq, 16, generator=gen).to(dtype)
    k = torch.randn(sum(lens_k), hkv, 16, generator=gen).to(dtype)
    v = torch.randn(sum(lens_k), hkv, 16, generator=gen).to(dtype)
    return q, k, v, cu_q, cu_k


def test_sparse_config_reads_minicpm4_sparse_config_field_for_field():
    minicpm4 = {"block_size": 64, "dense_len": 8192, "init_blocks": 1, "kernel_size": 32, "kernel_stride": 16,
                "topk": 64, "use_nope": False, "window_size": 2048}
    cfg = SparseConfig.from_dict(minicpm4)
    assert cfg == SparseConfig()
    assert {name: cfg.to_dict()[name] for name in minicpm4} == minicpm4
    assert SparseConfig.from_dict(cfg.to_dict()) == cfg
    # The released semantics the fields imply: 64 + 2048 // 64 = 96 ids, 32 local blocks before the query's
    # own, kernels 4b-1 .. 4b+3 pooled onto block b, the normaliser's keys 4x coarser.
    assert (cfg.budget, cfg.local_blocks, cfg.pool_kernels) == (96, 32, 5)
    assert (cfg.normaliser, cfg.coarse_kernel_size, cfg.coarse_kernel_stride) == ("coarse", 128, 64)
    with pytest.raises(ValueError, match="blocksize"):
        SparseConfig.from_dict({**minicpm4, "blocksize": 64})
    with pytest.raises(ValueError, match="multiples of kernel_stride"):
        SparseConfig(kernel_stride=24)
    with pytest.raises(ValueError, match="forced blocks"):
        SparseConfig(topk=1)
    with pytest.raises(ValueError, match="normaliser"):
        SparseConfig(normaliser="fp32")


def test_compress_keys_are_window_means():
    cu = torch.tensor([0, 30, 37], dtype=torch.int32)  # 30 keys -> 6 kernels; 7 keys -> none (< kernel size)
    k = torch.cat([torch.arange(30.0), torch.arange(7.0)])[:, None, None].expand(37, 2, 16).contiguous()
    ck, cu_c = compress_keys(k, VarlenLayout(cu, cu, 16), 8, 4)
    assert cu_c.tolist() == [0, 6, 6]
    expected = (4 * torch.arange(6.0) + 3.5)[:, None, None].expand(6, 2, 16)  # mean of t = 4j .. 4j + 7
    torch.testing.assert_close(ck, expected)
    torch.testing.assert_close(ref.compress_keys_ref(k, cu, 8, 4)[0], expected)


def check_selection_invariants(chosen, positions, cfg):
    """Budget, -1 only at the tail, no repeats, causality, and the forced blocks among the ids."""
    pos = positions.long()
    bs = cfg.block_size
    for g in range(chosen.shape[0]):
        for row in range(chosen.shape[1]):
            picked = chosen[g, row]
            q_block = int(pos[row]) // bs
            n = int((picked >= 0).sum())
            assert n == min(cfg.budget, q_block + 1)  # every causal block is a candidate
            assert (picked[n:] == -1).all()
            blocks = set(picked[:n].tolist())
            assert len(blocks) == n and max(blocks) <= q_block
            forced = {*range(min(cfg.init_blocks, q_block + 1)), *range(max(q_block - cfg.local_blocks, 0),
                                                                       q_block + 1)}
            assert forced <= blocks
            assert picked[: len(forced)].tolist() == sorted(forced)  # forced first, in block order


@pytest.mark.parametrize(
    ("case", "normaliser", "topk"),
    [("gqa1-varlen-decode", "coarse", 6), ("gqa2-one-block", "coarse", 6), ("gqa8-chunk", "coarse", 6),
     ("gqa8-chunk", "exact", 6), ("gqa1-varlen-decode", "exact", 16)],  # 16: more than any sequence's blocks
)
def test_selection_matches_reference_and_keeps_invariants(case, normaliser, topk):
    cfg = SparseConfig(**{**TINY, "topk": topk, "normaliser": normaliser})
    q, k, _, cu_q, cu_k = make_batch(case)
    layout = VarlenLayout(cu_q, cu_k, 16)
    chosen = select_blocks(q, k, layout, cfg)
    assert torch.equal(chosen, ref.select_blocks_full_ref(q, k, cu_q, cu_k, cfg))
    check_selection_invariants(chosen, layout.positions, cfg)


def test_exact_block_scores_are_pooled_group_probabilities():
    """With the exact normaliser a head's probabilities sum to 1, so a block scores in [0, heads per group]."""
    q, k, _, cu_q, cu_k = make_batch("gqa8-chunk")
    scores = ref.block_scores_ref(q, k, cu_q, cu_k, SparseConfig(**TINY, normaliser="exact"))
    assert scores.min() >= 0 and scores.max() <= 8 + 1e-5
    coarse = ref.block_scores_ref(q, k, cu_q, cu_k, SparseConfig(**TINY))
    assert torch.equal(coarse, coarse.to(torch.bfloat16).float())  # stored in bf16
    assert not torch.equal(coarse, scores.to(torch.bfloat16).float())  # another normaliser


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_equal_scores_go_to_lower_blocks(backend):
    """Zero keys give every kernel the same logit: every block scores the same, the lowest blocks win."""
    cfg = SparseConfig(**{**TINY, "window_size": 1, "topk": 4})  # no local blocks but the query's own
    cu = torch.tensor([0, 160], dtype=torch.int32)
    q = torch.randn(160, 2, 16, generator=torch.Generator().manual_seed(6))
    chosen = select_blocks_varlen(q, torch.zeros(160, 1, 16), cu, cu, cfg, backend=backend)
    # Last query (position 159): init block 0 and its own block 9 forced, then the equal scores 1, 2.
    assert chosen[0, -1].tolist() == [0, 9, 1, 2]
    assert chosen[0, 0].tolist() == [0, -1, -1, -1]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_selection_finds_the_planted_blocks(backend):
    """Keys of blocks 3 and 5 point along the query: they must win the two free slots of the last query."""
    cfg = SparseConfig(**{**TINY, "window_size": 16, "topk": 4})  # budget 5: init 0, local 6 and 7, two free
    gen = torch.Generator().manual_seed(1)
    direction = F.normalize(torch.randn(16, generator=gen), dim=0)
    k = 0.1 * torch.randn(128, 1, 16, generator=gen)
    k[48:64, 0] += direction
    k[80:96, 0] += direction
    q = (4 * direction).expand(128, 2, 16).contiguous()
    cu = torch.tensor([0, 128], dtype=torch.int32)
    chosen = select_blocks_varlen(q, k, cu, cu, cfg, backend=backend)
    assert chosen[0, -1].tolist()[:3] == [0, 6, 7] and sorted(chosen[0, -1].tolist()[3:]) == [3, 5]


@triton.jit
def _merge_both_ways(TOP, KEYS, OUT, M: tl.constexpr, KB: tl.constexpr):
    r, c = tl.arange(0, M)[:, None], tl.arange(0, KB)[None, :]
    top, keys = tl.load(TOP + r * KB + c), tl.load(KEYS + r * KB + c)
    tl.store(OUT + r * KB + c, _merge_top(top, keys, True))
    tl.store(OUT + M * KB + r * KB + c, _merge_top(top, keys, False))


def test_bitonic_merge_equals_argmax_merge():
    """The GPU merges with tl.topk, the interpreter with repeated argmax: same list, largest first."""
    gen = torch.Generator().manual_seed(7)
    keys = torch.randperm(4 * 64, generator=gen).view(4, 64).to(torch.int32)
    keys[keys < 60] = 0  # invalid candidates repeat the key 0
    top = keys[:, :32].sort(1, descending=True).values.contiguous()
    new = keys[:, 32:].contiguous()
    out = torch.empty(2, 4, 32, dtype=torch.int32)
    _merge_both_ways[(1,)](top, new, out, M=4, KB=32)
    expected = keys.sort(1, descending=True).values[:, :32]
    assert torch.equal(out[0], expected) and torch.equal(out[1], expected)


@pytest.mark.parametrize(
    ("case", "dtype", "block_m"),
    [("gqa1-varlen-decode", torch.float32, 16), ("gqa2-one-block", torch.bfloat16, 16),
     ("gqa8-chunk", torch.float32, 32), ("gqa8-chunk", torch.bfloat16, 64),
     ("gqa3-padded-heads", torch.float32, 16)],
)
def test_sparse_attention_forward_backward_match_reference(case, dtype, block_m):
    cfg = SparseConfig(**TINY)
    q, k, v, cu_q, cu_k = make_batch(case, dtype)
    block_idx = ref.select_blocks_full_ref(q, k, cu_q, cu_k, cfg)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = sparse_attention(q, k, v, block_idx, VarlenLayout(cu_q, cu_k, 16), 16, block_m=block_m)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    # The oracle runs in float32 on the same (rounded) inputs.
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = ref.sparse_attention_ref(q32, k32, v32, block_idx, cu_q, cu_k, 16)
    want_grads = torch.autograd.grad(want, (q32, k32, v32), grad_out.float())
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out.float(), want, **tol)
    for name, got, expected in zip("qkv", grads, want_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected, **tol, msg=lambda m, n=name: f"d{n}: {m}")


def dense_causal(q, k, v):
    """SDPA over [B, H, T, D] with queries at the last Tq key positions (bottom-right causal)."""
    group = q.shape[1] // k.shape[1]
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_topk_covering_every_block_equals_dense_sdpa(backend):
    cfg = {**TINY, "topk": 16}  # 100 keys = 7 blocks
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 70, 16, generator=gen, requires_grad=True)  # chunked prefill: 70 of 100 keys
    k = torch.randn(2, 2, 100, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 100, 16, generator=gen, requires_grad=True)
    out = infllmv2_attention(q, k, v, cfg, backend=backend)
    want = dense_causal(q, k, v)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn(out.shape, generator=gen)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                             torch.autograd.grad(want, (q, k, v), grad_out)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_backends_agree_and_sparse_differs_from_dense():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 160, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 160, 16, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 160, 16, generator=gen, requires_grad=True)
    outs = {b: infllmv2_attention(q, k, v, TINY, backend=b) for b in ("triton", "torch")}
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-4, atol=1e-5)
    grad_out = torch.randn(outs["torch"].shape, generator=gen)
    grads = {b: torch.autograd.grad(o, (q, k, v), grad_out) for b, o in outs.items()}
    for got, expected in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # 8 blocks of 16 out of 10: late queries really attend to fewer keys than dense.
    assert (outs["torch"][:, :, -50:] - dense_causal(q, k, v)[:, :, -50:]).abs().max() > 1e-2


def test_decode_row_equals_last_prefill_row():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 133, 16, generator=gen)
    k = torch.randn(2, 2, 133, 16, generator=gen)
    v = torch.randn(2, 2, 133, 16, generator=gen)
    prefill = infllmv2_attention(q, k, v, TINY, backend="triton")
    decode = infllmv2_attention(q[:, :, -1:], k, v, TINY, backend="triton")
    torch.testing.assert_close(decode, prefill[:, :, -1:], rtol=1e-5, atol=1e-6)


def test_varlen_entry_point_equals_separate_sequences():
    q, k, v, cu_q, cu_k = make_batch("gqa1-varlen-decode")
    packed = infllmv2_attention_varlen(q, k, v, cu_q, cu_k, TINY, backend="triton")
    for s in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        alone = infllmv2_attention_varlen(q[rows], k[keys], v[keys], cu_q[s : s + 2] - cu_q[s],
                                          cu_k[s : s + 2] - cu_k[s], TINY, backend="torch")
        torch.testing.assert_close(packed[rows], alone, rtol=1e-4, atol=1e-5)


def test_attention_output_is_deterministic():
    q, k, v, cu_q, cu_k = make_batch("gqa2-one-block")
    runs = [infllmv2_attention_varlen(q, k, v, cu_q, cu_k, TINY, backend="triton") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert not math.isnan(runs[0].sum().item())


@pytest.mark.parametrize(("backend", "num_queries"), [("triton", 150), ("torch", 150), ("torch", 20)])
def test_padded_batch_runs_sparse_on_each_unpadded_sequence(backend, num_queries):
    """A full row, a left-padded row, a right-padded row: each row's real tokens give what that sequence
    gives alone; padded query rows are zeros. With 20 queries the right-padded row has none."""
    gen = torch.Generator().manual_seed(8)
    tk = 150
    q = torch.randn(3, 4, num_queries, 16, generator=gen, requires_grad=True)
    k = torch.randn(3, 2, tk, 16, generator=gen, requires_grad=True)
    v = torch.randn(3, 2, tk, 16, generator=gen, requires_grad=True)
    mask = torch.ones(3, tk, dtype=torch.long)
    mask[1, :53] = 0
    mask[2, 120:] = 0
    out = infllmv2_attention(q, k, v, TINY, backend=backend, attention_mask=mask)
    real_q = mask[:, tk - num_queries :].bool()
    for b in range(3):
        keys = mask[b].bool()
        if real_q[b].any():
            alone = infllmv2_attention(q[b : b + 1, :, real_q[b]], k[b : b + 1, :, keys], v[b : b + 1, :, keys],
                                       TINY, backend="torch")
            torch.testing.assert_close(out[b : b + 1, :, real_q[b]], alone, rtol=1e-4, atol=1e-5)
        assert (out[b, :, ~real_q[b]] == 0).all()
    # Gradients reach real tokens only.
    dq, dk, _ = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert (dq.transpose(1, 2)[~real_q] == 0).all()
    assert (dk.transpose(1, 2)[~mask.bool()] == 0).all() and dk.abs().sum() > 0


def test_model_attention_runs_padded_batches_past_dense_len_sparse():
    from model.attention import attention

    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, h, 160, 16, generator=gen) for h in (4, 2, 2))
    mask = torch.ones(2, 160, dtype=torch.long)
    mask[1, :30] = 0
    sparse = {**TINY, "dense_len": 128}
    got = attention(q, k, v, sparse_config=sparse, attention_mask=mask)
    real = mask.bool()
    want = infllmv2_attention(q, k, v, sparse, backend="torch", attention_mask=mask)
    torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real], rtol=1e-4, atol=1e-5)
    dense = attention(q, k, v, sparse_config=None, attention_mask=mask)
    assert (got - dense).transpose(1, 2)[real].abs().max() > 1e-2  # 8 of 10 blocks: not dense
