"""Wall time of one verification with stage 1 cached vs the same comparison by training proxies from scratch.

Both sides run the same comparison (baseline vs candidate, for every configured seed) one run after another in
this process, so the ratio counts compute, not parallelism: cached = the decay-only anneals from the stage-1
checkpoint plus their evaluation; from scratch = per seed two full warmup + stable + decay runs (base mix alone,
and base mix with the candidate at candidate_ratio) plus the same evaluation. Stage 1 itself is timed once too.

    python benchmarks/verify.py                                         # configs/verify-tiny.yaml on CPU
    python benchmarks/verify.py --device cuda --config configs/my-verify.yaml --stable-steps 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.runtime import ensure_ray
from model.minicpm import MiniCPMForCausalLM
from model.tokenizer import load_tokenizer
from model.train import TrainConfig, pick_device, train
from pipelines.verify import ensure_stage1
from verification.anneal import AnnealRun, run_anneal
from verification.config import load_verification_config
from verification.evaluate import Evaluator

REPO = Path(__file__).resolve().parents[1]


def from_scratch(run: AnnealRun, config, stage1, out_dir: Path) -> dict[str, float]:
    """The same run trained from a fresh model through warmup, stable and decay on its anneal mix."""
    anneal_config = run.train_config(config, stage1, out_dir).model_dump()
    total = sum(s.ratio for s in config.base_mix)
    base_share = 1.0 if run.candidate is None else 1.0 - config.anneal.candidate_ratio
    sources = [{"path": s.path, "ratio": base_share * s.ratio / total} for s in config.base_mix]
    if run.candidate is not None:
        sources.append({"path": run.candidate.path, "ratio": config.anneal.candidate_ratio})
    anneal_config["data"]["sources"] = sources
    anneal_config.update(
        model=config.proxy.model,
        init_from=None,
        init_optimizer=False,
        tokenizer={"path": str(stage1.checkpoint_dir)},
        schedule={
            **anneal_config["schedule"],
            "warmup_steps": config.stage1.warmup_steps,
            "stable_steps": config.stage1.stable_steps,
        },
        eval_every=10**9,
        save_every=10**9,
    )
    result = train(TrainConfig.model_validate(anneal_config))
    device = pick_device(config.proxy.device)
    model = MiniCPMForCausalLM.from_pretrained(result.checkpoint_dir, dtype=torch.float32, device=device)
    evaluator = Evaluator(config.evaluation, load_tokenizer(stage1.checkpoint_dir), config.proxy.seq_len)
    return evaluator.evaluate(model, device=device, precision=config.proxy.precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "verify-tiny.yaml"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--stable-steps", type=int, help="override stage1.stable_steps (the size knob)")
    parser.add_argument("--decay-steps", type=int, help="override anneal.decay_steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_verification_config(args.config)
    work_dir = tempfile.mkdtemp(prefix="verify-bench-")
    stage1_update = {} if args.stable_steps is None else {"stable_steps": args.stable_steps}
    anneal_update = {} if args.decay_steps is None else {"decay_steps": args.decay_steps}
    config = config.model_copy(
        update={
            "work_dir": work_dir,
            "proxy": config.proxy.model_copy(update={"device": args.device}),
            "stage1": config.stage1.model_copy(update=stage1_update),
            "anneal": config.anneal.model_copy(update=anneal_update),
        }
    )
    candidate = config.candidates[0]
    ensure_ray(num_cpus=1)
    started = time.perf_counter()
    stage1 = ensure_stage1(config)
    stage1_seconds = time.perf_counter() - started
    ray.shutdown()

    runs = [r for seed in config.anneal.seeds
            for r in (AnnealRun.baseline(config, seed), AnnealRun.for_candidate(config, candidate, seed))]
    started = time.perf_counter()
    cached = [run_anneal(run, config, stage1) for run in runs]
    cached_seconds = time.perf_counter() - started

    started = time.perf_counter()
    scratch_dir = Path(work_dir) / "scratch"
    for run in runs:
        from_scratch(run, config, stage1, scratch_dir / f"{run.name}-seed{run.seed}")
    scratch_seconds = time.perf_counter() - started

    steps = config.stage1.warmup_steps + config.stage1.stable_steps
    print(f"device {args.device}, proxy {config.proxy.model['hidden_size']}x{config.proxy.model['num_hidden_layers']}"
          f", stage 1 {steps} steps, anneal {config.anneal.decay_steps} steps, "
          f"{len(config.anneal.seeds)} seeds x (baseline + {candidate.name})")
    print(f"stage 1 (once, shared by every later verification): {stage1_seconds:8.1f} s")
    print(f"verification, stage 1 cached ({len(runs)} anneals):     {cached_seconds:8.1f} s   1.00x")
    print(f"same comparison from scratch ({len(runs)} full runs):  {scratch_seconds:8.1f} s   "
          f"{scratch_seconds / cached_seconds:.2f}x the cached time")
    print(f"first verification incl. stage 1 vs from scratch:  "
          f"{scratch_seconds / (cached_seconds + stage1_seconds):.2f}x")
    print("reference loss after anneal: " + ", ".join(
        f"{r['name']}/seed{r['seed']} {r['metrics']['reference_loss']:.3f}" for r in cached))


if __name__ == "__main__":
    main()
