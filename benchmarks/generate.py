"""Generation speed: plain decoding vs speculative decoding vs speculative + FR-Spec, with the same target.

The setup mirrors a real deployment, scaled to a CPU: a target whose decode step is dominated by streaming its
weights (a 6-layer, 512-wide MiniCPM4-architecture model trained briefly by model/train.py on TinyShakespeare;
acceptance depends on how well the draft matches the target, not on how good the target is) and a draft 6-9x
cheaper per step (two 128-wide layers with the target's tokenizer and vocabulary), distilled on the target's
own outputs: greedy and sampled continuations of 2048 corpus prompts (half of them at T=0.7, the temperature the
benchmark and the UltraChat job sample at), each position labelled with the
target's next-token distribution (top-k soft labels, forward KL), as DistillSpec / EAGLE-style drafts are. The
evaluation prompts are excluded from distillation. FR-Spec token frequencies are counted over a corpus
(TinyShakespeare or a dataset version) with the target's tokenizer and saved beside the draft. Everything
trained is cached under --work-dir, keyed by its configuration, so a second run only measures.

Figures are ratios against plain decoding run in the same process, at the same batch size:
  * a table over batch sizes (decoding slots, continuous batching) of tokens/s over held-out prompts, for plain,
    speculative and speculative + FR-Spec decoding, with the mean accepted length (committed tokens per target
    forward pass per row) and the mean number of drafts per step the adaptive controller chose;
  * decode-step times of the target and the draft (forward + LM head + sampling distribution, full vocabulary vs
    the FR-Spec subset) by tokens per step; they give the controller its cost model.

    python benchmarks/generate.py --work-dir /tmp/genbench --threads 1   # CPU, small sizes, ~10 minutes first run
    python benchmarks/generate.py --size large --device cuda             # GPU sizes
"""

from __future__ import annotations

import argparse
import hashlib
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

from core.figures import save_figure
from core.io import atomic_path, atomic_write_text
from model.minicpm import MiniCPMConfig, MiniCPMForCausalLM
from model.schedule import wsd_lr
from model.tokenizer import TOKENIZER_NAME, load_tokenizer
from model.train import autocast_context, param_groups, train
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
        # A target whose decode step streams ~80 MB of weights (memory-bound like a GPU LLM), vs the draft's ~5 MB.
        "target_model": {"hidden_size": 512, "intermediate_size": 1280, "num_hidden_layers": 6,
                         "num_attention_heads": 8, "num_key_value_heads": 2, "dim_model_base": 64},
        "target_steps": 120,
        "target_batch_size": 8,
        "draft_model": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "num_key_value_heads": 1, "dim_model_base": 32},
        "draft_steps": 600,
        "draft_batch_size": 32,
        "seq_len": 128,
        "distill_prompts": 2048,
        "distill_tokens": 128,
        "distill_batch_size": 128,
        "distill_top_k": 64,
        "eval_prompts": 6,
        "max_new_tokens": 96,
    },
    "large": {
        "vocab_size": 32768,
        "target_model": {"hidden_size": 1024, "intermediate_size": 2560, "num_hidden_layers": 12,
                         "num_attention_heads": 16, "num_key_value_heads": 2, "dim_model_base": 256,
                         "max_position_embeddings": 2048},
        "target_steps": 1500,
        "target_batch_size": 32,
        "draft_model": {"hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "dim_model_base": 64, "max_position_embeddings": 2048},
        "draft_steps": 1500,
        "draft_batch_size": 32,
        "seq_len": 512,
        "distill_prompts": 2048,
        "distill_tokens": 256,
        "distill_batch_size": 256,
        "distill_top_k": 64,
        "eval_prompts": 16,
        "max_new_tokens": 256,
    },
}
PROMPT_TOKENS = 24  # evaluation and distillation prompts: the opening tokens of a TinyShakespeare speech
# Temperatures of the distillation continuations, one per batch in turn: half at T=0.7, the temperature the
# benchmark and configs/ultrachat.yaml sample at, so the draft learns the text it will be asked to predict.
DISTILL_TEMPERATURES = (0.0, 0.7, 1.0, 0.7)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def digest(*parts) -> str:
    """Short hash of a configuration, naming its cache entry under --work-dir."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def train_config(base: dict, *, out_dir: Path, model: dict | None, steps: int, batch_size: int, size: dict,
                 device: str, tokenizer: dict, sources: list[dict]) -> dict:
    warmup, decay = max(steps // 15, 1), max(steps // 8, 1)
    return {
        **base,
        "out_dir": str(out_dir),
        "model": model,
        "tokenizer": tokenizer,
        "data": {**base["data"], "sources": sources, "seq_len": size["seq_len"], "batch_size": batch_size},
        "schedule": {**base["schedule"], "warmup_steps": warmup, "stable_steps": steps - warmup - decay,
                     "decay_steps": decay},
        "device": device,
        "eval_every": steps,
        "save_every": steps,
    }


def shakespeare_paragraphs() -> list[str]:
    return [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if len(p) > 80]


def eval_paragraphs(count: int) -> list[str]:
    """Speeches whose openings are the evaluation prompts (chosen by a fixed seed)."""
    return random.Random(2).sample(shakespeare_paragraphs(), count)


def distillation_paragraphs(size: dict) -> list[str]:
    held_out = set(eval_paragraphs(size["eval_prompts"]))
    candidates = [p for p in shakespeare_paragraphs() if p not in held_out]
    return random.Random(1).sample(candidates, size["distill_prompts"])


def held_out_paragraphs(size: dict, count: int) -> list[str]:
    """The evaluation speeches, then further ones that the draft's distillation never saw, count in all."""
    evaluation = eval_paragraphs(size["eval_prompts"])
    seen = set(evaluation) | set(distillation_paragraphs(size))
    rest = [p for p in shakespeare_paragraphs() if p not in seen]
    return evaluation + random.Random(3).sample(rest, max(count - len(evaluation), 0))


def paragraph_prompts(tokenizer, paragraphs: list[str], prompt_tokens: int) -> list[str]:
    return [tokenizer.decode(tokenizer.encode(p).ids[:prompt_tokens]) for p in paragraphs]


@torch.no_grad()
def sample_with_soft_labels(target: MiniCPMForCausalLM, prompts: torch.Tensor, new_tokens: int, temperature: float,
                            top_k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Continue equal-length prompts [B, P] with the target (greedy when temperature is 0) and keep, for every
    position that predicts a generated token, the target's top_k next-token log-probabilities (temperature 1).

    Returns the sequences [B, P + new_tokens] and top ids [B, new_tokens, top_k] int32 / log-probs (float16),
    position t of the labels predicting token P + t.
    """
    batch, length = prompts.shape
    cache = target.new_cache(batch, length + new_tokens)
    logits = target(prompts, cache=cache).logits[:, -1]
    tokens, top_ids, top_logp = [], [], []
    for t in range(new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logp.topk(top_k, dim=-1)
        top_ids.append(ids.to(torch.int32).cpu())
        top_logp.append(values.half().cpu())
        if temperature == 0.0:
            token = logp.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(logp / temperature, -1), 1, generator=generator).squeeze(-1)
        tokens.append(token)
        if t + 1 < new_tokens:
            logits = target(token[:, None], cache=cache).logits[:, -1]
    sequences = torch.cat([prompts, torch.stack(tokens, 1)], dim=1).cpu()
    return sequences, torch.stack(top_ids, 1), torch.stack(top_logp, 1)


def distillation_set(path: Path, target_dir: Path, size: dict, device: torch.device) -> dict:
    """The target's continuations of training-corpus prompts, batch by batch at DISTILL_TEMPERATURES (0 = greedy),
    labelled with the target's top-k next-token distribution at every generated position. Cached at path."""
    if path.is_file():
        return torch.load(path)
    target = MiniCPMForCausalLM.from_pretrained(target_dir, device=device).eval()
    tokenizer = load_tokenizer(target_dir)
    bos = tokenizer.token_to_id("<s>")
    paragraphs = distillation_paragraphs(size)
    prompts = torch.tensor(
        [[bos] + ids[:PROMPT_TOKENS] for ids in (tokenizer.encode(p, add_special_tokens=False).ids for p in paragraphs)
         if len(ids) >= PROMPT_TOKENS]
    )
    generator = torch.Generator(device=device).manual_seed(1)
    temperatures = DISTILL_TEMPERATURES
    parts = {"sequences": [], "top_ids": [], "top_logp": []}
    step = size["distill_batch_size"]
    start_time = time.perf_counter()
    for i, begin in enumerate(range(0, len(prompts), step)):
        out = sample_with_soft_labels(target, prompts[begin:begin + step].to(device), size["distill_tokens"],
                                      temperatures[i % len(temperatures)], size["distill_top_k"], generator)
        for key, value in zip(parts, out):
            parts[key].append(value)
        print(f"  distillation set: {begin + len(out[0])}/{len(prompts)} continuations"
              f" ({time.perf_counter() - start_time:.0f} s)", flush=True)
    data = {key: torch.cat(value) for key, value in parts.items()}
    data["prompt_tokens"] = prompts.shape[1]
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return data


def soft_label_loss(model: MiniCPMForCausalLM, sequences, top_ids, top_logp, prompt_tokens: int):
    """Forward KL to the target's (top-k, renormalised) next-token distribution at the generated positions, up to
    the target's entropy; also the fraction of those positions where the draft's argmax is the target's."""
    hidden = model.final_hidden(sequences[:, :-1])[:, prompt_tokens - 1:]  # positions that predict generated tokens
    logq = torch.log_softmax((hidden @ model.lm_head_weight().T).float(), dim=-1)
    teacher = torch.softmax(top_logp.float(), dim=-1)
    loss = -(teacher * logq.gather(-1, top_ids.long())).sum(-1).mean()
    return loss, logq.detach().argmax(-1) == top_ids[..., 0]


def distil_draft(out_dir: Path, data: dict, target_dir: Path, base: dict, size: dict, device: torch.device,
                 steps: int) -> tuple[Path, dict]:
    """Train the draft from scratch on the distillation set; every 20th sequence is held out."""
    meta_path = out_dir / "distill.json"
    if meta_path.is_file():
        return out_dir, json.loads(meta_path.read_text())
    torch.manual_seed(0)
    vocab = load_tokenizer(target_dir).get_vocab_size()
    config = MiniCPMConfig.from_dict({**base["model"], **size["draft_model"], "vocab_size": vocab})
    model = MiniCPMForCausalLM(config).to(device).train()
    optim = base["optim"]
    optimizer = torch.optim.AdamW(param_groups(model, optim["weight_decay"]), lr=optim["lr"], betas=optim["betas"])
    tensors = [data[k] for k in ("sequences", "top_ids", "top_logp")]
    held_out = torch.arange(len(tensors[0])) % 20 == 19  # every 20th: greedy and sampled continuations alike
    train_set = [t[~held_out] for t in tensors]
    eval_set = [t[held_out].to(device) for t in tensors]
    count, held = len(train_set[0]), len(eval_set[0])
    warmup, decay = max(steps // 15, 1), max(steps // 4, 1)
    order = torch.Generator().manual_seed(0)
    batch = size["draft_batch_size"]
    start_time = time.perf_counter()
    for step in range(steps):
        lr = wsd_lr(step, max_lr=optim["lr"], warmup_steps=warmup, stable_steps=steps - warmup - decay,
                    decay_steps=decay, decay_shape="cosine", min_lr_ratio=0.05)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        index = torch.randint(0, count, (batch,), generator=order)
        with autocast_context(device, "auto"):
            loss, _ = soft_label_loss(model, *(t[index].to(device) for t in train_set), data["prompt_tokens"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"  draft step {step + 1}/{steps}: soft-label loss {loss.item():.3f}"
                  f" ({time.perf_counter() - start_time:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad(), autocast_context(device, "auto"):
        losses = [soft_label_loss(model, *(t[i:i + batch] for t in eval_set), data["prompt_tokens"])
                  for i in range(0, held, batch)]
    meta = {"steps": steps, "held_out_sequences": held,
            "held_out_soft_label_loss": sum(x[0].item() * x[1].numel() for x in losses)
            / sum(x[1].numel() for x in losses),
            "held_out_top1_agreement": torch.cat([x[1].flatten() for x in losses]).float().mean().item()}
    model.save_pretrained(out_dir)
    load_tokenizer(target_dir).save(str(out_dir / TOKENIZER_NAME))
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return out_dir, meta


def build_models(args, size: dict) -> tuple[Path, Path]:
    """Train (or find cached) target and draft checkpoints; save FR-Spec frequencies beside the draft."""
    work = Path(args.work_dir)
    base = yaml.safe_load(PROXY_CONFIG.read_text())
    shakespeare = {"path": str(SHAKESPEARE), "ratio": 1.0}
    target_model = {**base["model"], **size["target_model"]}
    target_key = digest(target_model, size["vocab_size"], size["target_steps"], size["target_batch_size"],
                        size["seq_len"])
    target_cfg = train_config(
        base, out_dir=work / f"target-{target_key}", model=target_model, steps=size["target_steps"],
        batch_size=size["target_batch_size"], size=size, device=args.device,
        tokenizer={"train_on": [str(SHAKESPEARE)], "vocab_size": size["vocab_size"]}, sources=[shakespeare],
    )
    print("training the target ...", flush=True)
    target_result = train(target_cfg)
    target_dir = target_result.checkpoint_dir
    print(f"target: eval loss {target_result.final_eval_loss:.3f} after {target_result.steps} steps", flush=True)

    device = torch.device(args.device)
    distill_keys = ("distill_prompts", "distill_tokens", "distill_top_k", "eval_prompts")
    distill_key = digest(target_key, [size[k] for k in distill_keys], PROMPT_TOKENS, DISTILL_TEMPERATURES)
    print("sampling the target's continuations for distillation ...", flush=True)
    data = distillation_set(work / f"distill-{distill_key}.pt", target_dir, size, device)
    draft_key = digest(distill_key, base["model"], size["draft_model"], size["draft_steps"], size["draft_batch_size"],
                       base["optim"])
    print("distilling the draft ...", flush=True)
    draft_dir, meta = distil_draft(work / f"draft-{draft_key}", data, target_dir, base, size, device,
                                   size["draft_steps"])
    print(f"draft: held-out soft-label loss {meta['held_out_soft_label_loss']:.3f}, top-1 agreement with the"
          f" target {100 * meta['held_out_top1_agreement']:.1f}% after {meta['steps']} steps", flush=True)
    TokenFrequencies.count(args.corpus, load_tokenizer(target_dir)).save(draft_dir)
    for name, directory in (("target", target_dir), ("draft", draft_dir)):
        point_at(work / name, directory)
    return target_dir, draft_dir


def point_at(link: Path, directory: Path) -> None:
    """``<work>/target`` and ``<work>/draft`` name the newest pair, so configs (configs/ultrachat.yaml) need no hash."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(directory.resolve(), target_is_directory=True)
    os.replace(tmp, link)


@torch.no_grad()
def decode_step(model: MiniCPMForCausalLM, head, *, batch: int, context: int, device: torch.device,
                compiled: bool = False):
    """One decode step over batch rows at a fixed cache length, as a function to time: forward, LM head (full or
    subset), sampling probabilities. compiled: the forward as GenerationEngine(torch_compile=True) runs it (a mask
    given, the cache holding one), so the timings are the compiled steps' and their graphs are the engine's."""
    settings = GenerationSettings(temperature=0.7)
    cache = model.new_cache(batch, context + 1)
    ids = torch.randint(0, model.config.vocab_size, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    model.final_hidden(ids[:, :context], cache=cache)
    forward, kwargs = model.final_hidden, {}
    if compiled:
        forward = torch.compile(model.final_hidden, dynamic=True)
        cache.attention_mask = torch.ones(batch, context + 1, dtype=torch.long, device=device)
        kwargs = {"attention_mask": cache.attention_mask.clone(),
                  "position_ids": torch.full((batch, 1), context, device=device)}

    @torch.no_grad()
    def step():
        hidden = forward(ids[:, context:].clone(), cache=cache, **kwargs)
        logits_to_probs(head(hidden).float(), settings)
        cache.crop(context)

    return step


def best_step_seconds(steps: dict, repeat: int, device: torch.device, blocks: int = 8) -> dict:
    """Mean time of each step function over `repeat` calls, the best of `blocks` blocks. The blocks of all steps
    are interleaved, so a burst of other load on the machine slows one block of each rather than all of one."""
    for step in steps.values():
        step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(blocks):
        for key, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeat):
                step()
            synchronize(device)
            best[key] = min(best[key], (time.perf_counter() - start) / repeat)
    return best


def relative_costs(step_seconds: dict[int, float]) -> dict[int, float]:
    """Step times by tokens per step relative to the one-token step: the controller's cost table."""
    return {n: round(t / step_seconds[1], 4) for n, t in step_seconds.items() if n > 1}


def measure(engines: dict, prompts: list[str], settings: GenerationSettings, device, rounds: int,
            batch_size: int, full_warm_up: bool = False) -> dict:
    """Decode all prompts with every engine through batch_size slots (continuous batching), rounds times
    interleaved; keep each engine's best time. Interleaving and the minimum make the ratios robust to other load.
    full_warm_up: warm up on the whole run, so that compiled engines meet every kind of step before the clock runs."""
    for engine in engines.values():
        engine.max_batch_size = batch_size
        engine.generate(prompts if full_warm_up else prompts[:batch_size],
                        settings if full_warm_up else settings.model_copy(update={"max_new_tokens": 8}))
    seconds = dict.fromkeys(engines, float("inf"))
    results = {}
    for _ in range(rounds):
        for mode, engine in engines.items():
            synchronize(device)
            start = time.perf_counter()
            results[mode] = engine.generate(prompts, settings)
            synchronize(device)
            seconds[mode] = min(seconds[mode], time.perf_counter() - start)
    figures = {}
    for mode, generations in results.items():
        tokens = sum(len(g.token_ids) for g in generations)
        figures[mode] = {
            "tokens": tokens,
            "seconds": seconds[mode],
            "tokens_per_s": tokens / seconds[mode],
            "mean_accepted_length": tokens / sum(g.stats.target_steps for g in generations),
            "drafted_per_step": sum(g.stats.drafted_tokens for g in generations)
            / sum(g.stats.target_steps for g in generations),
            "accepted_lengths": [n for g in generations for n in g.stats.accepted_lengths],
            "token_ids": [g.token_ids for g in generations],
        }
    return figures


def write_chart(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["runs"]), figsize=(6 * len(report["runs"]), 4), squeeze=False)
    for ax, (name, by_batch) in zip(axes[0], report["runs"].items()):
        batches = [int(b) for b in by_batch]
        for mode in ("speculative", "speculative+FR-Spec"):
            ratios = [by_batch[str(b)][mode]["tokens_per_s"] / by_batch[str(b)]["plain"]["tokens_per_s"]
                      for b in batches]
            ax.plot(batches, ratios, marker="o", label=mode)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(f"{name}: tokens/s vs plain batched decoding")
        ax.set_xlabel("batch size (decoding slots)")
        ax.set_ylabel("speed-up")
        ax.legend()
    save_figure(fig, path)


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
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="decoding slots, comma-separated")
    parser.add_argument("--prompts", type=int, default=None,
                        help="held-out prompts decoded at every batch size (default: the largest batch size); more "
                        "prompts steady the sampled cells, whose accepted lengths vary from prompt to prompt")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a busy box)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="decoding steps of both models through torch.compile in every mode, plain included "
                        "(GenerationEngine(torch_compile=True)); the step costs are measured compiled too")
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
    plain = GenerationEngine.from_pretrained(target_dir, device=device, torch_compile=args.torch_compile)
    target, draft, tokenizer = plain.target, MiniCPMForCausalLM.from_pretrained(draft_dir, device=device), plain.tokenizer
    frequencies = TokenFrequencies.load(draft_dir)
    subset = frequencies.top_tokens(args.frspec_fraction, tuple(plain.eos_ids))

    context, steps = 64, 10
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    # The cost model of the adaptive controller, measured: a target pass by the tokens it reads (rows x (k + 1):
    # flat while a pass is bound by reading the weights, rising once it is compute-bound, as a CPU soon is), a
    # draft step against a one-token target step, and a draft step by rows.
    heads = {
        "target": (target, lambda h: h @ target.lm_head_weight().T, (1, 2, 4, 8, 16, 32, 64, 128)),
        "draft_full_vocab": (draft, lambda h: h @ draft.lm_head_weight().T, (1, 2, 4, 8, 16)),
        "draft_frspec": (draft, FRSpecHead(draft.lm_head_weight(), subset), (1, 2, 4, 8, 16)),
    }
    seconds = best_step_seconds({(name, n): decode_step(model, head, batch=n, context=context, device=device,
                                                        compiled=args.torch_compile)
                                 for name, (model, head, batches) in heads.items() for n in batches}, steps, device)
    target_steps, full_steps, frspec_steps = ({n: seconds[name, n] for n in heads[name][2]} for name in heads)

    def speculative(steps: dict[int, float], fraction: float) -> SpeculativeConfig:
        return SpeculativeConfig(draft_cost_ratio=steps[1] / target_steps[1],
                                 target_step_costs=relative_costs(target_steps),
                                 draft_step_costs=relative_costs(steps), frspec_fraction=fraction,
                                 max_draft_tokens=10)

    engines = {
        "plain": plain,
        "speculative": GenerationEngine(target, tokenizer, draft, speculative=speculative(full_steps, 1.0),
                                        torch_compile=args.torch_compile),
        "speculative+FR-Spec": GenerationEngine(
            target, tokenizer, draft, frspec_frequencies=frequencies,
            speculative=speculative(frspec_steps, args.frspec_fraction), torch_compile=args.torch_compile,
        ),
    }
    prompts = paragraph_prompts(tokenizer, held_out_paragraphs(size, args.prompts or max(batch_sizes)), PROMPT_TOKENS)
    runs = {
        "sampling T=0.7": GenerationSettings(max_new_tokens=size["max_new_tokens"], temperature=0.7, ignore_eos=True,
                                             seed=3),
        "greedy": GenerationSettings(max_new_tokens=size["max_new_tokens"], temperature=0.0, ignore_eos=True),
    }
    milliseconds = {name: {n: 1e3 * t for n, t in table.items()}
                    for name, table in (("target", target_steps), ("draft_full_vocab", full_steps),
                                        ("draft_frspec", frspec_steps))}
    report = {
        "size": args.size, "device": str(device), "threads": torch.get_num_threads(),
        "torch_compile": args.torch_compile, "vocab_size": target.config.vocab_size,
        "target_parameters": target.num_parameters(), "draft_parameters": draft.num_parameters(),
        "frspec_subset": int(subset.numel()), "prompts": len(prompts),
        "decode_step_ms_by_tokens": milliseconds,
        "controller_costs": {mode: engine.speculative.model_dump() for mode, engine in engines.items() if mode != "plain"},
        "runs": {},
    }
    print(f"\ntarget {report['target_parameters'] / 1e6:.2f} M parameters, draft {report['draft_parameters'] / 1e6:.2f} M,"
          f" vocabulary {target.config.vocab_size}, FR-Spec subset {subset.numel()} tokens; device {device},"
          f" {torch.get_num_threads()} threads{', decoding steps compiled' if args.torch_compile else ''}")
    for name, table in milliseconds.items():
        print(f"decode step ms, {name}, by tokens per step: "
              + ", ".join(f"{n}: {ms:.2f}" for n, ms in table.items()))
    print(f"FR-Spec draft step {full_steps[1] / frspec_steps[1]:.2f}x faster; controller: draft cost ratio"
          f" {full_steps[1] / target_steps[1]:.3f} (FR-Spec {frspec_steps[1] / target_steps[1]:.3f})")
    for name, settings in runs.items():
        report["runs"][name] = by_batch = {}
        print(f"\n{name}: {len(prompts)} prompts x {settings.max_new_tokens} new tokens through B decoding slots;"
              " ratios against plain batched decoding at the same B")
        print(f"  {'B':>3}{'plain tok/s':>13}{'speculative':>13}{'ratio':>7}{'acc.len':>8}{'k/step':>7}"
              f"{'+FR-Spec':>10}{'ratio':>7}{'acc.len':>8}{'k/step':>7}{'identical':>10}")
        for batch in batch_sizes:
            figures = by_batch[str(batch)] = measure(engines, prompts, settings, device, args.rounds, batch,
                                                     full_warm_up=args.torch_compile)
            base = figures["plain"]["tokens_per_s"]
            line = f"  {batch:>3}{base:>13.1f}"
            for mode in ("speculative", "speculative+FR-Spec"):
                f = figures[mode]
                line += (f"{f['tokens_per_s']:>{13 if mode == 'speculative' else 10}.1f}"
                         f"{f['tokens_per_s'] / base:>6.2f}x{f['mean_accepted_length']:>8.2f}"
                         f"{f['drafted_per_step']:>7.2f}")
            identical = all(f["token_ids"] == figures["plain"]["token_ids"] for f in figures.values())
            print(line + (f"{identical!s:>10}" if settings.greedy else f"{'-':>10}"), flush=True)
            for f in figures.values():
                del f["token_ids"]
    out = Path(args.work_dir) / "generate_benchmark.json"
    atomic_write_text(out, json.dumps(report, indent=1))
    write_chart(out.with_suffix(".png"), report)
    print(f"\nreport: {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
