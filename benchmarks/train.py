"""Training throughput of the proxy model: tokens/s per variant, as ratios to fp32 eager in the same process.

One training step is forward + backward + AdamW over a [batch, seq_len] batch of random tokens (throughput does
not depend on the text). On CUDA it also prints MFU against the device's dense bf16 peak.

    python benchmarks/train.py                               # tiny config on CPU
    python benchmarks/train.py --device cuda --size 0.5b     # MiniCPM4-0.5B shape on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.minicpm import MiniCPMConfig, MiniCPMForCausalLM

CONFIGS = {"tiny": "configs/proxy-tiny.yaml", "0.5b": "configs/minicpm4-0.5b.yaml"}


def model_config(size: str) -> tuple[MiniCPMConfig, dict]:
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / CONFIGS[size]).read_text())
    fields = {"vocab_size": raw["tokenizer"].get("vocab_size", 4096), **raw["model"]}
    return MiniCPMConfig.from_dict(fields), raw["data"]


def flops_per_token(config: MiniCPMConfig, seq_len: int) -> float:
    """6 x (non-embedding matmul params + LM head) plus causal attention scores and values, forward + backward."""
    c = config
    per_layer = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer += 3 * c.hidden_size * c.intermediate_size
    matmul_params = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    attention = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len / 2  # causal half
    return 6 * matmul_params + 3 * attention


def measure(model, batch, *, precision: str, steps: int, warmup: int, device: torch.device) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )

    def step():
        with autocast:
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch.numel() * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch-size", type=int, help="default: the config's batch_size")
    parser.add_argument("--seq-len", type=int, help="default: the config's seq_len")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow first compile)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (torch.set_num_threads)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU; default: H100/H200 989")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config, data = model_config(args.size)
    batch_size, seq_len = args.batch_size or data["batch_size"], args.seq_len or data["seq_len"]
    torch.manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
    variants = [("fp32 eager", "fp32", False)]
    if device.type == "cpu" or torch.cuda.is_bf16_supported():
        variants.append(("bf16 autocast", "bf16", False))
    if args.compile:
        variants.append(
            (
                "bf16 autocast + compile" if device.type == "cuda" else "fp32 + compile",
                "bf16" if device.type == "cuda" else "fp32",
                True,
            )
        )

    print(
        f"{args.size}: {MiniCPMForCausalLM(config).num_parameters() / 1e6:.2f} M params, batch {batch_size} x "
        f"{seq_len} tokens, device {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({torch.get_num_threads()} threads)"
        )
    )
    baseline = None
    for name, precision, compiled in variants:
        torch.manual_seed(0)
        model = MiniCPMForCausalLM(config).to(device).train()
        runner = torch.compile(model) if compiled else model
        tokens_per_s = measure(
            runner, batch, precision=precision, steps=args.steps, warmup=args.warmup, device=device
        )
        baseline = baseline or tokens_per_s
        line = f"  {name:<26} {tokens_per_s:>12,.0f} tokens/s   {tokens_per_s / baseline:5.2f}x fp32 eager"
        if device.type == "cuda":
            mfu = tokens_per_s * flops_per_token(config, seq_len) / ((args.peak_tflops or 989.0) * 1e12)
            line += f"   MFU {100 * mfu:5.1f}%"
        print(line, flush=True)


if __name__ == "__main__":
    main()
