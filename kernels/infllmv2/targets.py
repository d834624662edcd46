"""Compile proof: every InfLLM v2 kernel built for real GPUs (sm_80 A100, sm_90 H100) on a machine without one.

`triton.compile` with an explicit GPUTarget lowers a kernel to PTX and assembles a cubin with the ptxas that the
triton wheel ships, no driver needed. Each kernel is compiled at MiniCPM4 shapes (bf16, head dim 128, 2 kv
heads, 32 query heads, block 64) with every autotune configuration that its shared-memory estimate keeps for
the target, as the autotuner would prune on that GPU; the argument specialisation (16-byte divisibility) is
the JIT's for a typical launch. A row reports the shared memory the launch needs (metadata.shared), the
registers and stack frame (register spills) per thread (cuobjdump -res-usage), and whether it fits the target.

    python -m kernels.infllmv2.targets          # the table; run without TRITON_INTERPRET
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import selection, sparse_attention
from .config import SparseConfig
from .triton_ops import SHARED_MEMORY_LIMIT, fitting_configs

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}


@dataclass(frozen=True)
class Launch:
    """One kernel as the model launches it: every argument's value (a torch dtype stands for a tensor)."""

    name: str
    kernel: Any  # the autotuner wrapping the JITFunction
    args: dict[str, Any]


@dataclass
class CompiledKernel:
    kernel: str
    target: str
    config: str
    shared_bytes: int
    shared_estimate: int
    shared_limit: int
    registers: int
    stack_bytes: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit


def minicpm4_launches(hq: int = 32, hkv: int = 2, d: int = 128, num_queries: int = 131072,
                      block_m: int = 64) -> list[Launch]:
    """The six kernels at MiniCPM4-8B shapes and sparse_config, for a 128 K-token prefill (the selection with
    both normalisers)."""
    cfg = SparseConfig()
    bf16, f32, i32, i64 = torch.bfloat16, torch.float32, torch.int32, torch.int64
    group, budget, nq = hq // hkv, cfg.budget, num_queries
    tables = {"cu_seqlens_q": i32, "cu_seqlens_k": i32, "tile_seq": i32, "tile_start": i32}
    strides_q = {"stride_qn": hq * d, "stride_qh": d}
    strides_c = {"stride_cn": hkv * d, "stride_ch": d}
    select_shape = {"GROUP": group, "KERNEL": cfg.kernel_size, "STRIDE": cfg.kernel_stride, "D": d,
                    "BLOCK_M": selection.SELECT_BLOCK_M}
    launches = [
        Launch("compress_keys", selection._compress_keys_kernel,
               {"K": bf16, "CK": bf16, "cu_seqlens_k": i32, "cu_seqlens_c": i32, "stride_kn": hkv * d,
                "stride_kh": d, **strides_c, "KERNEL": cfg.kernel_size, "STRIDE": cfg.kernel_stride, "D": d}),
        Launch("log_normaliser", selection._log_normaliser_kernel,
               {"Q": bf16, "CK": bf16, "LSE": f32, **tables, "cu_seqlens_c": i32, **strides_q, **strides_c,
                "stride_lh": nq, "qk_scale": 0.1, **select_shape, "KERNEL": cfg.coarse_kernel_size,
                "STRIDE": cfg.coarse_kernel_stride}),
    ]
    for exact in (False, True):
        launches.append(Launch(
            "select_exact" if exact else "select", selection._select_kernel,
            {"Q": bf16, "CK": bf16, "LSE": f32, "IDX": i32, **tables, "cu_seqlens_c": i32, **strides_q,
             **strides_c, "stride_lh": nq, "stride_ih": nq * budget, "stride_in": budget, "qk_scale": 0.1,
             **select_shape, "BLOCK_SIZE": cfg.block_size, "POOL": cfg.pool_kernels,
             "INIT_BLOCKS": cfg.init_blocks, "LOCAL_BLOCKS": cfg.local_blocks, "BUDGET": budget, "EXACT": exact,
             "KB": selection.candidates_per_merge(cfg)}))
    # Per-tile block lists are as wide as the busiest tile's union of blocks: data-dependent, not a multiple
    # of 16 in general.
    tokens, heads = sparse_attention.tile_shape(group, block_m)
    n_tiles = -(-nq // tokens)
    attention = {"Q": bf16, "K": bf16, "V": bf16, "LSE": f32, "cu_seqlens_q": i32, "cu_seqlens_k": i32,
                 **strides_q, "stride_kn": hkv * d, "stride_kh": d, "stride_lh": nq, "qk_scale": 0.1,
                 "GROUP": group, "HEADS": heads, "TOKENS": tokens, "D": d, "BLOCK_SIZE": cfg.block_size}
    per_tile = {"TILE_BLOCKS": i32, "TILE_MASKS": i64, "TILE_COUNT": i32, "tile_seq": i32, "tile_start": i32,
                "stride_tbh": n_tiles * 131, "stride_tbt": 131, "stride_tch": n_tiles}
    backward = {"DO": bf16, "DELTA": f32, "sm_scale": 0.1}
    launches += [
        Launch("sparse_fwd", sparse_attention._sparse_fwd_kernel, {**attention, **per_tile, "O": bf16}),
        Launch("sparse_bwd_dq", sparse_attention._sparse_bwd_dq_kernel,
               {**attention, **per_tile, **backward, "DQ": bf16}),
        Launch("sparse_bwd_dkdv", sparse_attention._sparse_bwd_dkdv_kernel,
               {**attention, **backward, "DK": bf16, "DV": bf16, "KB_TILES": i32, "KB_MASKS": i64,
                "KB_COUNT": i32, "kb_seq": i32, "kb_index": i32, "tile_start": i32,
                "stride_kth": 4096 * 37, "stride_ktb": 37, "stride_kch": 4096}),
    ]
    return launches


def _source(launch: Launch, config: triton.Config) -> ASTSource:
    """What the JIT would build: tensors as 16-byte-aligned pointers, ints specialised on divisibility by 16."""
    fn = launch.kernel.fn
    values = {**launch.args, **config.kwargs}
    missing = set(fn.arg_names) - set(values)
    if missing:
        raise ValueError(f"{launch.name}: no value for {sorted(missing)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.dtype):
            signature[name], attrs[(i,)] = POINTER_TYPES[value], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack frame bytes per thread: register spills) of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                                capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK):(\d+)", report))
    return int(usage["REG"]), int(usage["STACK"])


def _compile(job: tuple[str, int, str]) -> CompiledKernel:
    """Compile (kernel name, index of its configuration, target); names, not objects, cross to workers."""
    name, index, target_name = job
    launch = next(launch for launch in minicpm4_launches() if launch.name == name)
    config, target = launch.kernel.configs[index], TARGETS[target_name]
    compiled = triton.compile(_source(launch, config), target=target,
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    if "ptx" not in compiled.asm or "cubin" not in compiled.asm:
        raise RuntimeError(f"{name} for {target_name}: no PTX or cubin produced")
    registers, stack = _resource_usage(compiled.asm["cubin"])
    estimate = launch.kernel.shared_estimate({**launch.args, **config.kwargs, "num_stages": config.num_stages,
                                              "num_warps": config.num_warps})
    return CompiledKernel(name, target_name, _describe(config), compiled.metadata.shared, estimate,
                          SHARED_MEMORY_LIMIT[target.arch], registers, stack)


def _describe(config: triton.Config) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} warps={config.num_warps} stages={config.num_stages}".strip()


def compile_jobs(targets: list[str]) -> list[tuple[str, int, str]]:
    """Every (kernel, configuration kept for the target by its shared-memory estimate, target)."""
    jobs = []
    for target in targets:
        limit = SHARED_MEMORY_LIMIT[TARGETS[target].arch]
        for launch in minicpm4_launches():
            candidates = launch.kernel.configs
            kept = fitting_configs(candidates, launch.kernel.shared_estimate, launch.args, limit)
            if not kept:
                raise RuntimeError(f"{launch.name}: no configuration is estimated to fit {target}")
            jobs += [(launch.name, candidates.index(config), target) for config in kept]
    return jobs


def compile_all(targets: list[str] | None = None, workers: int = 2) -> list[CompiledKernel]:
    """Compile every job at MiniCPM4 shapes, `workers` compilations at a time."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile proof needs the compiler: run it without TRITON_INTERPRET=1")
    jobs = compile_jobs(targets or list(TARGETS))
    if workers <= 1:
        return [_compile(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile, jobs))


def format_table(rows: list[CompiledKernel]) -> str:
    header = (f"{'kernel':<16} {'target':<6} {'config':<34} {'shared KB':>9} {'limit KB':>8} {'regs':>5} "
              f"{'stack B':>7}  fits")
    lines = [header]
    for r in rows:
        lines.append(f"{r.kernel:<16} {r.target:<6} {r.config:<34} {r.shared_bytes / 1024:>9.1f} "
                     f"{r.shared_limit / 1024:>8.0f} {r.registers:>5} {r.stack_bytes:>7}  "
                     f"{'yes' if r.fits else 'NO'}")
    return "\n".join(lines)


def main() -> None:
    """Print the table (exit 1 if a launch does not fit), or with --json the rows (exit 0 once all compiled)."""
    rows = compile_all()
    if "--json" in sys.argv:
        print(json.dumps([{**asdict(r), "fits": r.fits} for r in rows]))
        return
    print(format_table(rows))
    sys.exit(0 if all(r.fits for r in rows) else 1)


if __name__ == "__main__":
    main()
