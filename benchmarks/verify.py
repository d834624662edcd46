"""Efficient verification: its statistical power on a graded series, and the saving of a cached stage 1.

Power (``configs/verify-cpu.yaml``): a graded series made from real text (WikiText-2 valid by default): the text,
the text with half its lines shuffled within the line, and all lines shuffled; the three are verified as
candidates, each beside its automatic control, against the baseline, by the job itself (Ray, 2 CPUs). Printed: the
verdicts with their intervals, the decision metric per seed and whether the series ranks real < half < shuffled on
every seed, the separation of real from shuffled in units of its interval's half-width, the smallest effect the
config resolves (the half-width of a paired interval), and the wall time, stage 1 included.

Saving (``configs/verify-tiny.yaml``): one verification with stage 1 cached vs the same comparison by training
proxies from scratch. Both sides run one run after another in this process, so the ratio counts compute, not
parallelism: cached = the decay-only anneals from the stage-1 checkpoint plus their evaluation; from scratch = per
seed two full warmup + stable + decay runs (base mix alone, and with the candidate at candidate_ratio).

    python benchmarks/verify.py                                   # both, on CPU
    python benchmarks/verify.py --only power --series-source path/to/text.txt --reference path/to/held-out.txt
    python benchmarks/verify.py --only power --series-source ../shared/data/text/hongloumeng.txt --hold-out 0.2
    python benchmarks/verify.py --only saving --device cuda --config configs/my-verify.yaml --stable-steps 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.runtime import ensure_ray
from model.data import DataSource
from model.minicpm import MiniCPMForCausalLM
from model.tokenizer import load_tokenizer
from model.train import TrainConfig, pick_device, train
from pipelines.verify import ensure_stage1, verify
from verification.anneal import AnnealRun, run_anneal
from verification.config import Candidate, ReferenceSet, load_verification_config
from verification.controls import write_shuffled
from verification.decide import paired_interval
from verification.evaluate import Evaluator, summarize

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
    return summarize(evaluator.evaluate(model, device=device, precision=config.proxy.precision))


SERIES = (("real", 0.0), ("half-shuffled", 0.5), ("shuffled", 1.0))


def power(args) -> None:
    config = load_verification_config(args.power_config)
    work_dir = Path(tempfile.mkdtemp(prefix="verify-power-"))
    source = DataSource(args.series_source, text_column=args.text_column)
    reference = args.reference
    if args.hold_out:  # the source's last documents become the reference: in its domain, outside every mix
        documents = list(source.documents())
        cut = round(len(documents) * (1 - args.hold_out))
        seen = {" ".join(d.split()) for d in documents[:cut]}  # texts repeat (refrains, poems): keep them out
        held_out = [d for d in documents[cut:] if " ".join(d.split()) not in seen]
        pq.write_table(pa.table({"content": documents[:cut]}), work_dir / "source.parquet")
        pq.write_table(pa.table({"content": held_out}), work_dir / "reference.parquet")
        source, reference = DataSource(str(work_dir / "source.parquet")), str(work_dir / "reference.parquet")
    candidates = []
    for name, share in SERIES:
        write_shuffled(source, work_dir / f"{name}.parquet", share, seed=1)
        candidates.append(Candidate(name=name, path=str(work_dir / f"{name}.parquet")))
    evaluation = config.evaluation
    if reference:
        evaluation = evaluation.model_copy(update={"reference_sets": [ReferenceSet(
            name="reference", path=str(Path(reference).resolve()), max_sequences=256)]})
        config = config.model_copy(update={"decision": config.decision.model_copy(update={"metric": "loss:reference"})})
    config = config.model_copy(update={"work_dir": str(work_dir / "work"), "evaluation": evaluation})
    ensure_ray(num_cpus=args.cpus)
    started = time.perf_counter()
    result = verify(config, candidates)
    seconds = time.perf_counter() - started
    metric = config.decision.metric
    units = {}
    for run in result.runs:
        units.setdefault(run["name"], {})[run["seed"]] = run["units"]
    print(f"graded series of {args.series_source} ({len(config.anneal.seeds)} seeds, metric {metric}); "
          f"wall time {seconds:.0f} s on {args.cpus} CPUs, stage 1 included")
    for name, _ in SERIES:
        decision = result.decisions[name]
        print(f"  {name:<14} {decision.verdict:<13} {decision.reason}")
    losses = {name: {seed: summarize(u)[metric] for seed, u in units[name].items()} for name, _ in SERIES}
    monotonic = all(losses["real"][s] < losses["half-shuffled"][s] < losses["shuffled"][s] for s in losses["real"])
    for seed in sorted(losses["real"]):
        print(f"  seed {seed}: " + "  ".join(f"{name} {losses[name][seed]:.4f}" for name, _ in SERIES)
              + f"  baseline {summarize(units['baseline'][seed])[metric]:.4f}")
    print(f"  ranks real < half-shuffled < shuffled on every seed: {monotonic}")
    separation = paired_interval(metric, units["real"], units["shuffled"], config.decision)
    resolution = result.decisions["real"].versus_baseline.half_width
    print(f"power: real vs shuffled {separation.estimate:+.4f} [{separation.low:+.4f}, {separation.high:+.4f}] = "
          f"{separation.estimate / separation.half_width:.1f} half-widths of its interval; smallest effect resolved "
          f"(half-width of a paired interval vs the baseline): {resolution:.4f} (at 80% power: "
          f"{1.43 * resolution:.4f}); min_effect {config.decision.min_effect}")


def saving(args) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["power", "saving"])
    parser.add_argument("--power-config", default=str(REPO / "configs" / "verify-cpu.yaml"))
    parser.add_argument("--series-source", default=str(REPO / ".." / "shared" / "data" / "text" / "wikitext-2" /
                                                         "valid.txt"), help="real text for the graded series")
    parser.add_argument("--text-column", default="content", help="of a Parquet or JSONL series source")
    parser.add_argument("--reference", help="a held-out reference in the series' domain (default: the config's)")
    parser.add_argument("--hold-out", type=float, help="use this share of the source's last documents as reference")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--config", default=str(REPO / "configs" / "verify-tiny.yaml"), help="for the saving")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--stable-steps", type=int, help="override stage1.stable_steps (the size knob)")
    parser.add_argument("--decay-steps", type=int, help="override anneal.decay_steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if args.only != "saving":
        power(args)
        ray.shutdown()
    if args.only != "power":
        saving(args)


if __name__ == "__main__":
    main()
