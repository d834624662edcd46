"""InfLLM v2 sparse attention vs dense attention at MiniCPM4-8B shapes (32 query / 2 kv heads, head dim 128, bf16).

    python benchmarks/attention.py --device cuda     # times: sparse vs SDPA, forward and backward, 32K-128K
    python benchmarks/attention.py                   # CPU: keys attended and FLOPs vs dense, from shapes

On CUDA: medians over --repeats runs after a warm-up (Triton compiles and autotunes there), as ratios against
torch's SDPA (flash) measured in the same process; batch 8/4/2 at 32K/64K/128K as in the released kernels'
table. "select" is stage 1 alone, "backward" is the backward pass alone (the forward's graph kept).
On any machine: the fraction of causal keys each query attends and the attention FLOPs against dense causal
attention, from shapes, and from a real selection (random data, PyTorch path) where that is cheap; the
selection memory per layer from shapes; and the compile table of every kernel for sm_80 and sm_90 (shared
memory, registers, stack per thread), built without a GPU.
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
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.io import atomic_write_text
from kernels.infllmv2 import SparseConfig, infllmv2_attention, select_blocks_varlen
from kernels.infllmv2.selection import selection_memory_bytes
from kernels.infllmv2.sparse_attention import tile_shape

HEADS, KV_HEADS, HEAD_DIM = 32, 2, 128
# A stage-2 program's tile: 64 rows = 4 query tokens x the 16 query heads of a kv group.
TILE_TOKENS, _ = tile_shape(HEADS // KV_HEADS, 64)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: Triton compiles and autotunes here
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def keys_per_query(seqlen: int, cfg: SparseConfig) -> torch.Tensor:
    """Keys each query of a prefill attends, from shapes: all causal keys while its blocks fit the budget,
    else budget - 1 whole blocks and its own block up to itself."""
    pos = torch.arange(seqlen, dtype=torch.float64)
    own = pos % cfg.block_size + 1
    return torch.where(pos // cfg.block_size + 1 <= cfg.budget, pos + 1, (cfg.budget - 1) * cfg.block_size + own)


def shape_row(seqlen: int, cfg: SparseConfig) -> dict:
    """Attention FLOPs (QK^T and PV, forward, all heads) against dense causal, and stage-1 FLOPs, from shapes."""
    dense_keys = seqlen * (seqlen + 1) / 2
    sparse_keys = keys_per_query(seqlen, cfg).sum().item()
    pos = torch.arange(seqlen, dtype=torch.float64)
    # Stage 1 per query: pool_kernels kernels scored per causal block, and the coarse normaliser's keys.
    stage1_dots = (cfg.pool_kernels * (pos // cfg.block_size + 1) + pos / cfg.coarse_kernel_stride).sum().item()
    return {"tokens": seqlen, "keys_attended": sparse_keys / dense_keys, "stage2_vs_dense": sparse_keys / dense_keys,
            "stage1_vs_dense": stage1_dots / (2 * dense_keys)}  # a score is one dot, an attended key two


def measured_row(seqlen: int, cfg: SparseConfig) -> dict:
    """The same from a real selection on random data: keys attended, and what the stage-2 kernel computes:
    each tile visits the union of its tokens' blocks, with a tl.dot over all its rows (random queries share
    no blocks but the forced ones, the worst case for that union)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(seqlen, 2, 16, generator=gen)
    k = torch.randn(seqlen, 1, 16, generator=gen)
    cu = torch.tensor([0, seqlen], dtype=torch.int32)
    chosen = select_blocks_varlen(q, k, cu, cu, cfg, backend="torch")[0].long()  # [Nq, budget]
    pos = torch.arange(seqlen)
    first = chosen * cfg.block_size
    covered = torch.clamp(torch.minimum(pos[:, None] - first + 1, torch.full_like(first, cfg.block_size)), min=0)
    attended = torch.where(chosen >= 0, covered, 0).sum().item()
    tile_of = (pos // TILE_TOKENS)[:, None].expand_as(chosen)[chosen >= 0]
    pairs = torch.unique(tile_of * (seqlen // cfg.block_size + 1) + chosen[chosen >= 0])
    tile_flops = len(pairs) * TILE_TOKENS * cfg.block_size
    dense_keys = seqlen * (seqlen + 1) / 2
    return {"tokens": seqlen, "keys_attended": attended / dense_keys, "stage2_vs_dense": tile_flops / dense_keys}


def print_shapes(sizes: list[int], measure_up_to: int, cfg: SparseConfig) -> list[dict]:
    print(f"\nKeys attended and FLOPs vs dense causal attention (prefill, budget {cfg.budget} blocks of "
          f"{cfg.block_size}):")
    print(f"{'tokens':>8} {'source':>9} {'keys %':>7} {'stage-2 FLOPs %':>16} {'stage-1 FLOPs %':>16}")
    rows = []
    for seqlen in sizes:
        row = shape_row(seqlen, cfg)
        rows.append(row)
        print(f"{seqlen:>8} {'shapes':>9} {100 * row['keys_attended']:>6.2f}% {100 * row['stage2_vs_dense']:>15.2f}% "
              f"{100 * row['stage1_vs_dense']:>15.2f}%")
        if seqlen <= measure_up_to:
            real = measured_row(seqlen, cfg)
            rows.append({**real, "source": "selection"})
            print(f"{seqlen:>8} {'selection':>9} {100 * real['keys_attended']:>6.2f}% "
                  f"{100 * real['stage2_vs_dense']:>15.2f}%  (tiles of {TILE_TOKENS} tokens visit their union of blocks)")
    return rows


def print_selection_memory(cfg: SparseConfig, seqlen: int = 131072) -> int:
    fused = selection_memory_bytes([seqlen], [seqlen], HEADS, KV_HEADS, HEAD_DIM, cfg)
    score_buffer = KV_HEADS * seqlen * (-(-seqlen // cfg.block_size)) * 4
    print(f"\nSelection memory per layer at {seqlen // 1024}K tokens (from shapes): {fused / 2**20:.0f} MiB "
          f"(compressed keys, log-sum-exp, the [Hkv, Nq, {cfg.budget}] ids; scoring, pooling and top-k fused per "
          f"tile), against {score_buffer / 2**20:.0f} MiB for an fp32 [Hkv, Nq, n_blocks] score buffer")
    return fused


def print_compile_table() -> list[dict]:
    from kernels.infllmv2.targets import compile_all, format_table

    print("\nKernels compiled for sm_80 (A100) and sm_90 (H100) at MiniCPM4-8B shapes, every autotune "
          "configuration kept by the shared-memory estimate:")
    rows = compile_all()
    print(format_table(rows))
    return [{**vars(r), "fits": r.fits} for r in rows]


def backward_of(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    """The backward pass alone, repeatable: the forward's graph is kept."""
    return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)


def bench_cuda(seqlen: int, cfg: SparseConfig, repeats: int) -> dict:
    batch = max(1, 262144 // seqlen)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(heads):
        return torch.randn(batch, heads, seqlen, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen,
                           requires_grad=True)

    q, k, v = rand(HEADS), rand(KV_HEADS), rand(KV_HEADS)
    grad_out = torch.randn_like(q)

    def dense():
        # Flash only (never the math fallback, which would materialise [Tq, Tk] scores); kv heads repeated
        # for it, a copy that is noise next to the attention.
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(HEADS // KV_HEADS, 1),
                                                  v.repeat_interleave(HEADS // KV_HEADS, 1), is_causal=True)

    runs = {"dense": dense, "sparse": lambda: infllmv2_attention(q, k, v, cfg, backend="triton")}
    row = {"tokens": seqlen, "batch": batch}
    for name, fn in runs.items():
        with torch.no_grad():
            row[f"{name}_fwd_s"] = timed(fn, repeats)
        row[f"{name}_bwd_s"] = timed(backward_of(fn(), (q, k, v), grad_out), repeats)
    packed_q = q.detach()[0].transpose(0, 1).contiguous()
    packed_k = k.detach()[0].transpose(0, 1).contiguous()
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    row["select_s"] = timed(lambda: select_blocks_varlen(packed_q, packed_k, cu, cu, cfg, backend="triton"),
                            repeats) * batch
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--measure-up-to", type=int, default=32768,
                        help="CPU: compute a real selection (PyTorch path, random data) up to this length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the sm_80/sm_90 compile table")
    parser.add_argument("--out", type=Path, help="also write everything as JSON here")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1: the benchmark compiles the kernels")
    cfg = SparseConfig()
    print(f"device={args.device} heads={HEADS}/{KV_HEADS} head_dim={HEAD_DIM} sparse_config={cfg.to_dict()}")
    report: dict = {"config": cfg.to_dict()}
    if args.device == "cuda":
        print(f"{'tokens':>8} {'batch':>5} {'SDPA fwd':>10} {'sparse fwd':>11} {'speedup':>8} {'select':>8} "
              f"{'SDPA bwd':>10} {'sparse bwd':>11} {'speedup':>8}")
        report["timings"] = []
        for seqlen in args.sizes:
            r = bench_cuda(seqlen, cfg, args.repeats)
            report["timings"].append(r)
            print(f"{seqlen:>8} {r['batch']:>5} {r['dense_fwd_s'] * 1e3:>8.1f}ms {r['sparse_fwd_s'] * 1e3:>9.1f}ms "
                  f"{r['dense_fwd_s'] / r['sparse_fwd_s']:>7.2f}x {100 * r['select_s'] / r['sparse_fwd_s']:>7.0f}% "
                  f"{r['dense_bwd_s'] * 1e3:>8.1f}ms {r['sparse_bwd_s'] * 1e3:>9.1f}ms "
                  f"{r['dense_bwd_s'] / r['sparse_bwd_s']:>7.2f}x")
        print("select: share of the sparse forward spent in stage 1 (timed alone)")
    report["shapes"] = print_shapes(args.sizes, args.measure_up_to if args.device == "cpu" else 0, cfg)
    report["selection_memory_bytes_128k"] = print_selection_memory(cfg)
    if not args.no_compile:
        report["compiled"] = print_compile_table()
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
