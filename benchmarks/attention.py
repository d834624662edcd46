"""InfLLM v2 sparse attention vs dense SDPA: forward and forward+backward time, and the fraction of keys read.

    python benchmarks/attention.py --device cuda            # 8K..128K tokens, MiniCPM4 sparse_config, Triton
    python benchmarks/attention.py                          # CPU: small sizes, scaled config, PyTorch reference

Times are medians over --repeats runs after a warm-up, printed as ratios against dense SDPA (flash on CUDA)
measured in the same process. "select" is stage 1 (compressed keys, block scores, top-k), "attend" is
stage 2 (block-sparse attention forward) on the same selection, so where the time goes is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.io import atomic_write_text
from kernels.infllmv2 import SparseConfig, infllmv2_attention
from kernels.infllmv2.reference import select_blocks_full_ref, sparse_attention_ref

# On CPU the sizes are ~64x smaller, so blocks, kernels and window shrink with them to keep a similar sparsity.
CPU_CONFIG = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=128, topk=16,
                          dense_len=0)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: Triton compiles and autotunes here
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def keys_attended(block_idx: torch.Tensor, seqlen: int, block_size: int) -> float:
    """Fraction of the causal keys that the selected blocks cover, over all queries and kv heads."""
    pos = torch.arange(seqlen, device=block_idx.device)[None, :, None]
    first = block_idx.long() * block_size
    covered = torch.clamp(torch.minimum(pos - first + 1, torch.full_like(first, block_size)), min=0)
    covered = torch.where(block_idx >= 0, covered, 0).sum()
    causal = block_idx.shape[0] * seqlen * (seqlen + 1) / 2
    return covered.item() / causal


def bench_one(seqlen, args, cfg, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    shape_q, shape_k = (1, args.heads, seqlen, args.head_dim), (1, args.kv_heads, seqlen, args.head_dim)
    q = torch.randn(shape_q, device=device, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(shape_k, device=device, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(shape_k, device=device, dtype=dtype, generator=gen, requires_grad=True)
    grad_out = torch.randn(shape_q, device=device, dtype=dtype, generator=gen)

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def sparse():
        return infllmv2_attention(q, k, v, cfg, backend=args.backend)

    packed = [x.detach().transpose(1, 2).reshape(seqlen, x.shape[1], args.head_dim) for x in (q, k, v)]
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=device)
    if args.backend == "triton":
        from kernels.infllmv2.layout import VarlenLayout
        from kernels.infllmv2.selection import select_blocks
        from kernels.infllmv2.sparse_attention import sparse_attention

        layout = VarlenLayout(cu, cu, cfg.block_size)

        def select():
            return select_blocks(packed[0], packed[1], layout, cfg)

        block_idx = select()

        def attend():
            with torch.no_grad():
                return sparse_attention(*packed, block_idx, layout, cfg.block_size)
    else:
        def select():
            return select_blocks_full_ref(packed[0], packed[1], cu, cu, cfg)

        block_idx = select()

        def attend():
            with torch.no_grad():
                return sparse_attention_ref(*packed, block_idx, cu, cu, cfg.block_size)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def forward_backward(fn):
        def run():
            torch.autograd.grad(fn(), (q, k, v), grad_out)
        return run

    row = {"tokens": seqlen, "keys_attended": keys_attended(block_idx, seqlen, cfg.block_size)}
    row["dense_fwd_s"] = timed(forward(dense), device, args.repeats)
    row["sparse_fwd_s"] = timed(forward(sparse), device, args.repeats)
    row["select_s"] = timed(select, device, args.repeats)
    row["attend_s"] = timed(attend, device, args.repeats)
    row["dense_fwdbwd_s"] = timed(forward_backward(dense), device, args.repeats)
    row["sparse_fwdbwd_s"] = timed(forward_backward(sparse), device, args.repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", help="sequence lengths (default: by device)")
    parser.add_argument("--backend", choices=["triton", "torch"], help="default: triton on cuda, torch on cpu")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.backend = args.backend or ("triton" if on_gpu else "torch")
    if args.backend == "triton" and not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--backend triton on CPU needs TRITON_INTERPRET=1 (and tiny sizes)")
    sizes = args.sizes or ([8192, 32768, 65536, 131072] if on_gpu else [512, 1024, 2048])
    cfg = SparseConfig() if on_gpu else CPU_CONFIG
    dtype = torch.bfloat16 if on_gpu else torch.float32

    print(f"device={device} backend={args.backend} dtype={dtype} heads={args.heads}/{args.kv_heads} "
          f"head_dim={args.head_dim} sparse_config={cfg.to_dict()}")
    header = (f"{'tokens':>8} {'keys%':>7} {'dense fwd':>10} {'sparse fwd':>11} {'speedup':>8} {'select':>8} "
              f"{'attend':>8} {'dense f+b':>10} {'sparse f+b':>11} {'speedup':>8}")
    print(header)
    rows = []
    for seqlen in sizes:
        r = bench_one(seqlen, args, cfg, device, dtype)
        rows.append(r)
        print(f"{seqlen:>8} {100 * r['keys_attended']:>6.1f}% {r['dense_fwd_s'] * 1e3:>8.2f}ms "
              f"{r['sparse_fwd_s'] * 1e3:>9.2f}ms {r['dense_fwd_s'] / r['sparse_fwd_s']:>7.2f}x "
              f"{100 * r['select_s'] / (r['select_s'] + r['attend_s']):>7.0f}% "
              f"{100 * r['attend_s'] / (r['select_s'] + r['attend_s']):>7.0f}% "
              f"{r['dense_fwdbwd_s'] * 1e3:>8.2f}ms {r['sparse_fwdbwd_s'] * 1e3:>9.2f}ms "
              f"{r['dense_fwdbwd_s'] / r['sparse_fwdbwd_s']:>7.2f}x")
    print("select/attend: share of the sparse forward spent in stage 1 and stage 2 (each timed alone)")
    if args.out:
        atomic_write_text(args.out, json.dumps({"device": str(device), "backend": args.backend,
                                                "config": cfg.to_dict(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
