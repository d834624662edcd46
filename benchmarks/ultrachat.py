"""UltraChat synthesis speed: continuous vs static batching, speculative vs plain decoding, same seeds.

The target and the draft are the pair that benchmarks/generate.py trains (the proxy-tiny target on TinyShakespeare,
a smaller draft distilled from it, FR-Spec counts beside the draft), cached under --work-dir. The synthesis runs
in-process (no Ray: one engine, as inside one generation actor) over the same seeds of every family from
configs/ultrachat.yaml, one chunk per family, which the synthesizer hands the engine as one stream of requests (a
dialogue's next turn joins the queue when its last reply ends). Static batching decodes the queue batch_size
requests at a time, each batch until its longest answer ends; continuous batching gives a finished row's slot to the
next request at once. Answers end at a blank line (the target writes
TinyShakespeare speeches, whose lengths vary as chat answers do) or at max_new_tokens. Figures are ratios against
plain static batching in the same process. Every mode but the last reuses earlier turns' keys and values through
the prefix cache, as the job does (configs/ultrachat.yaml's prefix_cache_tokens; each family's chunk starts with an
empty cache); the last mode prefills every prompt whole, which measures the cache. Greedy decoding must give
identical dialogues in every mode (batching, speculation and prefix reuse are lossless); sampled runs are compared
on speed only.

    python benchmarks/ultrachat.py                               # CPU, small sizes (trains the pair first)
    python benchmarks/ultrachat.py --target T --draft D          # an existing pair
    python benchmarks/ultrachat.py --size large --device cuda    # GPU sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.figures import save_figure
from core.io import atomic_write_text
from sft_synth.config import DEFAULT_CONFIG, UltraChatConfig, parse_config
from sft_synth.dialogue import DialogueSynthesizer
from sft_synth.generation import GenerationEngine, SpeculativeConfig
from sft_synth.generation.prefix_cache import PrefixCache
from sft_synth.seeds import build_seeds

SHAKESPEARE = Path("../shared/data/text/tinyshakespeare.txt")
SIZES = {
    "small": {"seeds_per_family": 12, "turns": 2, "max_new_tokens": 128, "batch_size": 4},
    "large": {"seeds_per_family": 64, "turns": 3, "max_new_tokens": 256, "batch_size": 16},
}
MODES = {  # name: (speculative decoding, static batches, prefix cache)
    "plain, static": (False, True, True),
    "plain, continuous": (False, False, True),
    "speculative, static": (True, True, True),
    "speculative, continuous": (True, False, True),
    "speculative, continuous, no prefix cache": (True, False, False),
}


def load_generate_benchmark():
    spec = importlib.util.spec_from_file_location("generate_benchmark", REPO / "benchmarks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_config(work: Path, size: dict, temperature: float, speculative: bool) -> UltraChatConfig:
    """configs/ultrachat.yaml with the benchmark's counts and lengths; documents from a TinyShakespeare file."""
    data = yaml.safe_load((REPO / "configs" / "ultrachat.yaml").read_text())
    documents = work / "documents.parquet"
    if not documents.is_file():
        paragraphs = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if len(p) > 200]
        scenes = ["\n\n".join(paragraphs[i : i + 10]) for i in range(0, len(paragraphs) - 10, 10)]
        pq.write_table(pa.table({"content": paragraphs + scenes}), documents)
    data["families"]["knowledge"]["source"] |= {"path": str(documents), "min_chars": 200, "max_chars": 1000}
    data["families"]["long_context"]["source"] |= {"path": str(documents), "min_chars": 2000, "max_chars": 3000}
    data["families"]["reasoning"]["source"] = str(REPO / ".." / "shared" / "data" / "bench" / "gsm8k" / "train.jsonl")
    for family in data["families"].values():
        family["count"], family["turns"] = size["seeds_per_family"], size["turns"]
        for role in ("assistant", "user", "tool"):
            if role in family:
                family[role] = {**family[role], "max_new_tokens": size["max_new_tokens"], "temperature": temperature,
                                "speculative": speculative, "seed": 0, "stop": ["\n\n"]}
    return parse_config(data, "benchmark config")


class MeasuredEngine:
    """The engine as the synthesizer sees it, counting target forward passes, the tokens they committed and the
    prompt tokens the prefix cache saved from prefill.

    static: each call's prompts are decoded batch-size at a time, each batch to its end (static batching).
    prefix_cache: the engine's cache, or None to prefill every prompt whole."""

    def __init__(self, engine: GenerationEngine, static: bool, prefix_cache: PrefixCache | None):
        self.engine, self.static, self.prefix_cache, self.target_steps, self.lengths = engine, static, prefix_cache, 0, []
        self.tokenizer, self.target = engine.tokenizer, engine.target
        self.prompt_tokens = self.reused_prompt_tokens = 0

    def encode_prompt(self, prompt):
        return self.engine.encode_prompt(prompt)

    def serve(self, requests, on_finish, **kwargs):
        self.engine.continuous_batching = not self.static
        self.engine.prefix_cache = self.prefix_cache

        def measured(request, generation):
            self.target_steps += generation.stats.target_steps
            self.lengths.append(len(generation.token_ids))
            self.prompt_tokens += len(generation.prompt_token_ids)
            self.reused_prompt_tokens += generation.stats.reused_prompt_tokens
            return on_finish(request, generation)

        self.engine.serve(requests, measured, **kwargs)


def run_synthesis(engine: GenerationEngine, config: UltraChatConfig, seeds: dict, static: bool,
                  prefix_cache: PrefixCache | None, device) -> dict:
    engine = MeasuredEngine(engine, static, prefix_cache)
    dialogues, tokens = [], 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for family, family_seeds in seeds.items():
        synthesizer = DialogueSynthesizer(engine, family, getattr(config.families, family), config.seed)
        records = synthesizer.synthesize(family_seeds, 0)
        dialogues += records
        tokens += sum(r["generated_tokens"] for r in records)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    lengths = sorted(engine.lengths)
    return {"dialogues": len(dialogues), "tokens": tokens, "seconds": seconds,
            "dialogues_per_s": len(dialogues) / seconds, "tokens_per_s": tokens / seconds,
            "mean_accepted_length": sum(lengths) / max(engine.target_steps, 1),
            "prompt_tokens": engine.prompt_tokens, "reused_prompt_tokens": engine.reused_prompt_tokens,
            "message_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
            "messages": [r["messages"] for r in dialogues]}


def write_chart(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["runs"])
    fig, ax = plt.subplots(figsize=(max(6, 2.4 * len(names)), 4))
    width = 0.8 / len(MODES)
    for offset, mode in enumerate(MODES):
        values = [report["runs"][n][mode]["tokens_per_s"] for n in names]
        ax.bar([i + width * offset for i in range(len(names))], values, width=width, label=mode)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set_ylabel("generated tokens/s")
    ax.set_title("UltraChat synthesis: static vs continuous batching, plain vs speculative decoding")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", default=None, help="trained models are cached here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; the fastest of each mode counts")
    parser.add_argument("--target", help="target checkpoint dir (default: train the pair as benchmarks/generate.py)")
    parser.add_argument("--draft", help="draft checkpoint dir, with FR-Spec counts if it has them")
    parser.add_argument("--temperatures", default="0.7,0", help="comma-separated; 0 is greedy")
    parser.add_argument("--torch-compile", action="store_true",
                        help="decoding steps through torch.compile in every mode (GenerationEngine(torch_compile=True))")
    parser.add_argument("--costs", type=Path, default=None,
                        help="generate_benchmark.json of benchmarks/generate.py on the same models and machine: the "
                        "controller takes the step costs it measured (default: a draft cost from parameter counts, "
                        "passes bound by reading the weights)")
    args = parser.parse_args()
    os.chdir(REPO)  # the shared data is addressed relative to the repository root
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="ultrachat-bench-")
    size = SIZES[args.size]
    device = torch.device(args.device)

    if args.target and args.draft:
        target_dir, draft_dir = Path(args.target), Path(args.draft)
    else:
        generate = load_generate_benchmark()
        models_args = argparse.Namespace(work_dir=args.work_dir, device=args.device, corpus=str(SHAKESPEARE))
        target_dir, draft_dir = generate.build_models(models_args, generate.SIZES[args.size])
    speculative = SpeculativeConfig(max_draft_tokens=10)
    if args.costs:
        speculative = SpeculativeConfig(**json.loads(args.costs.read_text())["controller_costs"]["speculative+FR-Spec"])
    engine = GenerationEngine.from_pretrained(target_dir, draft_dir, device=device, speculative=speculative,
                                              max_batch_size=size["batch_size"], torch_compile=args.torch_compile)
    job_config = parse_config(yaml.safe_load(DEFAULT_CONFIG.read_text()), str(DEFAULT_CONFIG))
    prefix_cache_tokens = job_config.models.prefix_cache_tokens
    prefix_cache = PrefixCache(prefix_cache_tokens)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    report = {"size": args.size, "device": str(device), "threads": torch.get_num_threads(),
              "frspec": engine.frspec_head is not None, "batch_size": size["batch_size"],
              "speculative": engine.speculative.model_dump(), "prefix_cache_tokens": prefix_cache_tokens, "runs": {}}
    for temperature in (float(t) for t in args.temperatures.split(",")):
        configs = {speculative: benchmark_config(work, size, temperature, speculative) for speculative in (False, True)}
        seeds = build_seeds(configs[False], REPO)
        name = "greedy" if temperature == 0 else f"T={temperature}"
        runs = {}
        for _ in range(args.rounds):  # interleaved, best of rounds: robust to other load on the machine
            for mode, (speculative, static, cached) in MODES.items():
                run = run_synthesis(engine, configs[speculative], seeds, static, prefix_cache if cached else None,
                                    device)
                if mode not in runs or run["seconds"] < runs[mode]["seconds"]:
                    runs[mode] = run
        report["runs"][name] = runs
        base = runs["plain, static"]
        print(f"\n{name}: {base['dialogues']} dialogues ({len(seeds)} families x {size['seeds_per_family']}, "
              f"{size['turns']} turns, <= {size['max_new_tokens']} new tokens per message), {size['batch_size']} "
              "decoding slots")
        print(f"  {'mode':<42}{'dialogues/s':>12}{'tokens/s':>10}{'tokens':>8}{'vs plain static':>17}"
              f"{'accepted length':>17}{'prompt reused':>15}  message tokens min/median/max")
        for mode, figures in runs.items():
            spread = figures["message_tokens"]
            reused = figures["reused_prompt_tokens"] / max(figures["prompt_tokens"], 1)
            print(f"  {mode:<42}{figures['dialogues_per_s']:>12.3f}{figures['tokens_per_s']:>10.1f}"
                  f"{figures['tokens']:>8}{figures['tokens_per_s'] / base['tokens_per_s']:>16.2f}x"
                  f"{figures['mean_accepted_length']:>17.2f}{reused:>14.0%}  "
                  f"{spread['min']}/{spread['median']}/{spread['max']}")
        for decoding in ("plain", "speculative"):
            ratio = runs[f"{decoding}, continuous"]["tokens_per_s"] / runs[f"{decoding}, static"]["tokens_per_s"]
            print(f"  continuous vs static batching, {decoding} decoding: {ratio:.2f}x")
        cached = runs["speculative, continuous"]["tokens_per_s"]
        print(f"  prefix cache vs none, speculative continuous: "
              f"{cached / runs['speculative, continuous, no prefix cache']['tokens_per_s']:.2f}x")
        if temperature == 0:
            identical = all(r["messages"] == base["messages"] for r in runs.values())
            print(f"  greedy dialogues identical in every mode: {identical}")
    for runs in report["runs"].values():
        for figures in runs.values():
            del figures["messages"]
    out = work / "ultrachat_benchmark.json"
    atomic_write_text(out, json.dumps(report, indent=1))
    write_chart(out.with_suffix(".png"), report)
    print(f"\nmodels: target {target_dir}, draft {draft_dir} (FR-Spec: {report['frspec']})")
    print(f"report: {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
