"""Generation speed: plain decoding vs speculative decoding vs speculative + FR-Spec, with the same target.

The target is the tiny MiniCPM4-architecture proxy (configs/proxy-tiny.yaml's model) trained by model/train.py on
TinyShakespeare; the draft is a much smaller model trained by the same trainer on the target's own sampled
continuations (distillation) plus TinyShakespeare, with the target's tokenizer. FR-Spec token frequencies are
counted over a corpus (TinyShakespeare or a dataset version) and saved beside the draft. Everything trained is
cached under --work-dir, so a second run only measures.

Figures are ratios against plain decoding run in the same process:
  * tokens/s over the prompts, decoded one prompt at a time (speculation is a latency technique);
  * mean accepted length = committed tokens per target forward pass;
  * the draft's decode step (forward + LM head + sampling distribution), full vocabulary vs the FR-Spec subset.

    python benchmarks/generate.py                                  # CPU, small sizes, a few minutes
    python benchmarks/generate.py --size large --device cuda       # GPU sizes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.minicpm import MiniCPMForCausalLM
from model.tokenizer import load_tokenizer
from model.train import train
from pipelines.versioning import atomic_write_text
from sft_synth.generation import (
    FRSpecHead,
    GenerationEngine,
    GenerationSettings,
    SpeculativeConfig,
    TokenFrequencies,
)
from sft_synth.generation.sampling import logits_to_probs

SHAKESPEARE = Path("../shared/data/text/tinyshakespeare.txt")
PROXY_CONFIG = REPO / "configs" / "proxy-tiny.yaml"

SIZES = {
    "small": {
        "vocab_size": 8192,
        "target_model": {},  # proxy-tiny's model as is
        "target_steps": 150,
        "draft_model": {"hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "num_key_value_heads": 1, "dim_model_base": 32},
        "draft_steps": 300,
        "seq_len": 128,
        "batch_size": 16,
        "distill_prompts": 256,
        "distill_tokens": 128,
        "eval_prompts": 6,
        "max_new_tokens": 96,
    },
    "large": {
        "vocab_size": 32768,
        "target_model": {"hidden_size": 1024, "intermediate_size": 2560, "num_hidden_layers": 12,
                         "num_attention_heads": 16, "num_key_value_heads": 2, "dim_model_base": 256,
                         "max_position_embeddings": 2048},
        "target_steps": 1500,
        "draft_model": {"hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "dim_model_base": 64, "max_position_embeddings": 2048},
        "draft_steps": 1500,
        "seq_len": 512,
        "batch_size": 32,
        "distill_prompts": 2048,
        "distill_tokens": 256,
        "eval_prompts": 16,
        "max_new_tokens": 256,
    },
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_config(base: dict, *, out_dir: Path, model: dict | None, steps: int, size: dict, device: str,
                 tokenizer: dict, sources: list[dict]) -> dict:
    warmup, decay = max(steps // 15, 1), max(steps // 8, 1)
    return {
        **base,
        "out_dir": str(out_dir),
        "model": model,
        "tokenizer": tokenizer,
        "data": {**base["data"], "sources": sources, "seq_len": size["seq_len"], "batch_size": size["batch_size"]},
        "schedule": {**base["schedule"], "warmup_steps": warmup, "stable_steps": steps - warmup - decay,
                     "decay_steps": decay},
        "device": device,
        "eval_every": steps,
        "save_every": steps,
    }


def paragraph_prompts(tokenizer, count: int, prompt_tokens: int, seed: int) -> list[str]:
    """Openings of TinyShakespeare speeches (a speaker line plus the start of the speech), chosen by seed."""
    paragraphs = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if len(p) > 80]
    chosen = random.Random(seed).sample(paragraphs, count)
    return [tokenizer.decode(tokenizer.encode(p).ids[:prompt_tokens]) for p in chosen]


def build_models(args, size: dict) -> tuple[Path, Path]:
    """Train (or find cached) target and draft checkpoints; save FR-Spec frequencies beside the draft."""
    work = Path(args.work_dir)
    base = yaml.safe_load(PROXY_CONFIG.read_text())
    shakespeare = {"path": str(SHAKESPEARE), "ratio": 1.0}
    target_cfg = train_config(
        base, out_dir=work / "target", model={**base["model"], **size["target_model"]}, steps=size["target_steps"],
        size=size, device=args.device, tokenizer={"train_on": [str(SHAKESPEARE)], "vocab_size": size["vocab_size"]},
        sources=[shakespeare],
    )
    print("training the target ...", flush=True)
    target_result = train(target_cfg)
    target_dir = target_result.checkpoint_dir
    print(f"target: eval loss {target_result.final_eval_loss:.3f} after {target_result.steps} steps", flush=True)

    distilled = work / "distill.txt"
    if not distilled.is_file():
        print("sampling the target's continuations for distillation ...", flush=True)
        engine = GenerationEngine.from_pretrained(target_dir, device=args.device, max_batch_size=64)
        prompts = paragraph_prompts(engine.tokenizer, size["distill_prompts"], 12, seed=1)
        half = len(prompts) // 2
        # Greedy and sampled continuations, so the draft learns both the target's argmax and its spread.
        texts = []
        for chunk, temperature in ((prompts[:half], 0.0), (prompts[half:], 0.7)):
            settings = GenerationSettings(max_new_tokens=size["distill_tokens"], temperature=temperature, seed=1)
            texts += [p + g.text for p, g in zip(chunk, engine.generate(chunk, settings))]
        atomic_write_text(distilled, "\n\n".join(t.replace("\n\n", "\n") for t in texts) + "\n")

    draft_cfg = train_config(
        base, out_dir=work / "draft", model={**base["model"], **size["draft_model"]}, steps=size["draft_steps"],
        size=size, device=args.device, tokenizer={"path": str(target_dir)},
        sources=[{"path": str(distilled), "ratio": 0.9}, {**shakespeare, "ratio": 0.1}],
    )
    print("training the draft ...", flush=True)
    draft_result = train(draft_cfg)
    draft_dir = draft_result.checkpoint_dir
    print(f"draft: eval loss {draft_result.final_eval_loss:.3f} after {draft_result.steps} steps", flush=True)
    TokenFrequencies.count(args.corpus, load_tokenizer(target_dir)).save(draft_dir)
    return target_dir, draft_dir


@torch.no_grad()
def decode_step_seconds(model: MiniCPMForCausalLM, head, *, context: int, steps: int, device: torch.device) -> float:
    """Mean time of one decode step at a fixed cache length: forward, LM head (full or subset), probabilities."""
    settings = GenerationSettings(temperature=0.7)
    cache = model.new_cache(1, context + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    model.final_hidden(ids[:, :context], cache=cache)

    def step():
        hidden = model.final_hidden(ids[:, context:], cache=cache)
        logits_to_probs(head(hidden[:, -1]).float(), settings)
        cache.crop(context)

    for _ in range(5):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(engines: dict, prompts: list[str], settings: GenerationSettings, device, rounds: int) -> dict:
    """Decode the prompts one at a time with every engine, rounds times interleaved; keep each engine's best time.

    Interleaving and the minimum make the ratios robust to other load on the machine.
    """
    for engine in engines.values():
        engine.generate(prompts[:1], settings.model_copy(update={"max_new_tokens": 8}))  # warm-up
    seconds = dict.fromkeys(engines, float("inf"))
    results = {}
    for _ in range(rounds):
        for mode, engine in engines.items():
            elapsed, results[mode] = 0.0, []
            for prompt in prompts:
                synchronize(device)
                start = time.perf_counter()
                results[mode].extend(engine.generate([prompt], settings))
                synchronize(device)
                elapsed += time.perf_counter() - start
            seconds[mode] = min(seconds[mode], elapsed)
    figures = {}
    for mode, generations in results.items():
        tokens = sum(len(g.token_ids) for g in generations)
        figures[mode] = {
            "tokens": tokens,
            "seconds": seconds[mode],
            "tokens_per_s": tokens / seconds[mode],
            "mean_accepted_length": tokens / sum(g.stats.target_steps for g in generations),
            "accepted_lengths": [n for g in generations for n in g.stats.accepted_lengths],
            "token_ids": [g.token_ids for g in generations],
        }
    return figures


def write_histogram(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["runs"]), figsize=(6 * len(report["runs"]), 4), squeeze=False)
    for ax, (name, modes) in zip(axes[0], report["runs"].items()):
        top = max(max(m["accepted_lengths"]) for m in modes.values())
        for mode, figures in modes.items():
            if mode != "plain":
                ax.hist(figures["accepted_lengths"], bins=range(1, top + 2), alpha=0.5, align="left",
                        label=f"{mode} (mean {figures['mean_accepted_length']:.2f})")
        ax.set_title(f"tokens committed per target step, {name}")
        ax.set_xlabel("tokens per target step")
        ax.set_ylabel("target steps")
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", default=None, help="trained models are cached here (default: a temp dir)")
    parser.add_argument("--corpus", default=str(SHAKESPEARE),
                        help="FR-Spec frequency corpus: a text file or a dataset version / Parquet file / glob")
    parser.add_argument("--frspec-fraction", type=float, default=0.25)
    parser.add_argument("--target-steps", type=int, default=None, help="override the size's target training steps")
    parser.add_argument("--draft-steps", type=int, default=None, help="override the size's draft training steps")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; the best of them counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a busy box)")
    args = parser.parse_args()
    os.chdir(REPO)  # the shared data is addressed relative to the repository root
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="generate-bench-")
    size = {**SIZES[args.size]}
    for key in ("target_steps", "draft_steps"):
        size[key] = getattr(args, key) or size[key]
    device = torch.device(args.device)

    target_dir, draft_dir = build_models(args, size)
    plain = GenerationEngine.from_pretrained(target_dir, device=device)
    target, draft, tokenizer = plain.target, MiniCPMForCausalLM.from_pretrained(draft_dir, device=device), plain.tokenizer
    frequencies = TokenFrequencies.load(draft_dir)
    subset = frequencies.top_tokens(args.frspec_fraction, tuple(plain.eos_ids))

    context, steps = 64, 200
    target_step = decode_step_seconds(target, lambda h: h @ target.lm_head_weight().T, context=context, steps=steps,
                                      device=device)
    full_step = decode_step_seconds(draft, lambda h: h @ draft.lm_head_weight().T, context=context, steps=steps,
                                    device=device)
    frspec_step = decode_step_seconds(draft, FRSpecHead(draft.lm_head_weight(), subset), context=context, steps=steps,
                                      device=device)

    def speculative(cost: float, fraction: float) -> SpeculativeConfig:
        return SpeculativeConfig(draft_cost_ratio=cost, frspec_fraction=fraction, max_draft_tokens=10)

    engines = {
        "plain": plain,
        "speculative": GenerationEngine(target, tokenizer, draft, speculative=speculative(full_step / target_step, 1.0)),
        "speculative+FR-Spec": GenerationEngine(
            target, tokenizer, draft, frspec_frequencies=frequencies,
            speculative=speculative(frspec_step / target_step, args.frspec_fraction),
        ),
    }
    prompts = paragraph_prompts(tokenizer, size["eval_prompts"], 24, seed=2)
    runs = {
        "greedy": GenerationSettings(max_new_tokens=size["max_new_tokens"], temperature=0.0, ignore_eos=True),
        "sampling T=0.7": GenerationSettings(max_new_tokens=size["max_new_tokens"], temperature=0.7, ignore_eos=True,
                                             seed=3),
    }
    report = {
        "size": args.size, "device": str(device), "threads": torch.get_num_threads(), "vocab_size": target.config.vocab_size,
        "target_parameters": target.num_parameters(), "draft_parameters": draft.num_parameters(),
        "frspec_subset": int(subset.numel()),
        "decode_step_ms": {"target": 1e3 * target_step, "draft_full_vocab": 1e3 * full_step,
                           "draft_frspec": 1e3 * frspec_step},
        "runs": {},
    }
    print(f"\ntarget {report['target_parameters'] / 1e6:.2f} M parameters, draft {report['draft_parameters'] / 1e6:.2f} M,"
          f" vocabulary {target.config.vocab_size}, FR-Spec subset {subset.numel()} tokens; device {device},"
          f" {torch.get_num_threads()} threads")
    print(f"decode step: target {1e3 * target_step:.2f} ms, draft {1e3 * full_step:.2f} ms,"
          f" draft with FR-Spec {1e3 * frspec_step:.2f} ms -> FR-Spec draft step {full_step / frspec_step:.2f}x faster")
    for name, settings in runs.items():
        report["runs"][name] = measure(engines, prompts, settings, device, args.rounds)
        figures = report["runs"][name]
        base = figures["plain"]
        print(f"\n{name}: {len(prompts)} prompts x {settings.max_new_tokens} new tokens, one prompt at a time")
        print(f"  {'mode':<22}{'tokens/s':>10}{'speed-up':>10}{'accepted length':>17}")
        for mode, f in figures.items():
            print(f"  {mode:<22}{f['tokens_per_s']:>10.1f}{f['tokens_per_s'] / base['tokens_per_s']:>9.2f}x"
                  f"{f['mean_accepted_length']:>17.2f}")
        full, fr = figures["speculative"], figures["speculative+FR-Spec"]
        loss = 1 - (fr["mean_accepted_length"] - 1) / (full["mean_accepted_length"] - 1)
        print(f"  FR-Spec accepted-draft loss vs full-vocabulary draft: {100 * loss:.1f}%")
        if settings.greedy:
            identical = all(f["token_ids"] == base["token_ids"] for f in figures.values())
            print(f"  greedy outputs identical to plain decoding: {identical}")
    out = Path(args.work_dir) / "generate_benchmark.json"
    atomic_write_text(out, json.dumps(report, indent=1))
    write_histogram(out.with_suffix(".png"), report)
    print(f"\nreport: {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
