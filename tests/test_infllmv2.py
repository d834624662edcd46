"""InfLLM v2 kernels against their PyTorch references, hand-computed answers and dense SDPA.

Triton runs on the CPU interpreter here, so shapes are tiny: block 16, kernel 8, stride 4, head dim 16.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, so CPU tensors run the kernels

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.infllmv2 import SparseConfig, infllmv2_attention, infllmv2_attention_varlen
from kernels.infllmv2 import reference as ref
from kernels.infllmv2.layout import VarlenLayout
from kernels.infllmv2.selection import block_scores, compress_keys, select_blocks, topk_blocks
from kernels.infllmv2.sparse_attention import sparse_attention

TINY = {"block_size": 16, "kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "window_size": 32, "topk": 6,
        "dense_len": 0}

# (query heads, kv heads, query lengths, key lengths): GQA 1/2/8; lengths off the block grid, a single
# block, a sequence shorter than one kernel, a decode row, and chunked prefill (Tq < Tk).
CASES = {
    "gqa1-varlen-decode": (2, 2, [100, 1, 5], [100, 53, 5]),
    "gqa2-one-block": (4, 2, [16, 9], [16, 9]),
    "gqa8-chunk": (8, 1, [40, 90], [110, 90]),
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


def test_sparse_config_defaults_are_minicpm4_and_unknown_keys_fail():
    minicpm4 = {"block_size": 64, "dense_len": 8192, "init_blocks": 1, "kernel_size": 32, "kernel_stride": 16,
                "topk": 64, "use_nope": False, "window_size": 2048}
    assert SparseConfig.from_dict(minicpm4) == SparseConfig()
    assert SparseConfig().to_dict() == minicpm4
    assert SparseConfig().pool_kernels == 5  # kernels starting at -16, 0, 16, 32, 48 overlap a 64-token block
    with pytest.raises(ValueError, match="blocksize"):
        SparseConfig.from_dict({**minicpm4, "blocksize": 64})
    with pytest.raises(ValueError, match="multiples of kernel_stride"):
        SparseConfig(kernel_stride=24)
    with pytest.raises(ValueError, match="forced blocks"):
        SparseConfig(topk=8)


def test_compress_keys_are_window_means():
    cfg = SparseConfig(**TINY)
    cu = torch.tensor([0, 30, 37], dtype=torch.int32)  # 30 keys -> 6 kernels; 7 keys -> none (< kernel size)
    k = torch.cat([torch.arange(30.0), torch.arange(7.0)])[:, None, None].expand(37, 2, 16).contiguous()
    ck, cu_c = compress_keys(k, VarlenLayout(cu, cu, 16), cfg)
    assert cu_c.tolist() == [0, 6, 6]
    expected = (4 * torch.arange(6.0) + 3.5)[:, None, None].expand(6, 2, 16)  # mean of t = 4j .. 4j + 7
    torch.testing.assert_close(ck, expected)
    torch.testing.assert_close(ref.compress_keys_ref(k, cu, cfg)[0], expected)


@pytest.mark.parametrize("case", CASES)
def test_block_scores_match_reference(case):
    cfg = SparseConfig(**TINY)
    q, k, _, cu_q, cu_k = make_batch(case)
    got = block_scores(q, k, VarlenLayout(cu_q, cu_k, 16), cfg, block_m=16)
    want = ref.block_scores_ref(q, k, cu_q, cu_k, cfg)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)
    # Scores are group sums of probabilities: each lies in [0, heads per group].
    assert want[finite].min() >= 0 and want[finite].max() <= q.shape[1] // k.shape[1] + 1e-5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("topk", [6, 16])  # 16 is more than any sequence's blocks
def test_topk_matches_reference_and_keeps_invariants(case, topk):
    cfg = SparseConfig(**{**TINY, "topk": topk})
    q, k, _, cu_q, cu_k = make_batch(case)
    layout = VarlenLayout(cu_q, cu_k, 16)
    scores = ref.block_scores_ref(q, k, cu_q, cu_k, cfg)
    chosen = topk_blocks(scores, layout, cfg)
    assert torch.equal(chosen, ref.select_blocks_ref(scores, layout.positions, cfg))

    pos = layout.positions.long()
    num_causal = pos // 16 + 1
    for g in range(chosen.shape[0]):
        for row in range(chosen.shape[1]):
            picked = chosen[g, row]
            n = int((picked >= 0).sum())
            assert n == min(topk, int(num_causal[row]))  # random data: every causal block has a score
            assert (picked[n:] == -1).all()  # padding only at the tail
            blocks = set(picked[:n].tolist())
            assert len(blocks) == n
            assert max(blocks) * 16 <= pos[row]  # causality: no block starts after the query
            window_first = max(int(pos[row]) - cfg.window_size + 1, 0) // 16
            assert {0, *range(window_first, int(pos[row]) // 16 + 1)} <= blocks


def test_topk_ties_go_to_lower_blocks():
    cfg = SparseConfig(**{**TINY, "window_size": 1, "topk": 4})
    cu = torch.tensor([0, 160], dtype=torch.int32)
    layout = VarlenLayout(cu, cu, 16)
    chosen = topk_blocks(torch.zeros(1, 160, 10), layout, cfg)
    # Last query (position 159): init block 0 and its own block 9 forced, then equal scores 1, 2.
    assert chosen[0, -1].tolist() == [0, 9, 1, 2]
    assert chosen[0, 0].tolist() == [0, -1, -1, -1]


def test_selection_finds_the_planted_blocks():
    """Keys of blocks 3 and 5 point along the query: they must win the two free slots of the last query."""
    cfg = SparseConfig(**{**TINY, "window_size": 16, "topk": 4})
    gen = torch.Generator().manual_seed(1)
    direction = F.normalize(torch.randn(16, generator=gen), dim=0)
    k = 0.1 * torch.randn(128, 1, 16, generator=gen)
    k[48:64, 0] += direction
    k[80:96, 0] += direction
    q = (4 * direction).expand(128, 2, 16).contiguous()
    cu = torch.tensor([0, 128], dtype=torch.int32)
    chosen = select_blocks(q, k, VarlenLayout(cu, cu, 16), cfg, block_m=32)
    assert sorted(chosen[0, -1].tolist()) == [0, 3, 5, 7]  # init 0, local 7, planted 3 and 5
    assert torch.equal(chosen, ref.select_blocks_full_ref(q, k, cu, cu, cfg))


@pytest.mark.parametrize(
    ("case", "dtype", "block_m"),
    [("gqa1-varlen-decode", torch.float32, 16), ("gqa2-one-block", torch.bfloat16, 16),
     ("gqa8-chunk", torch.float32, 32), ("gqa8-chunk", torch.bfloat16, 64)],
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
    # 6 blocks of 16 out of 10: late queries really attend to fewer keys than dense.
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
