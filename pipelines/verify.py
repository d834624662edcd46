"""``python -m pipelines.verify CONFIG``: verify candidate pools by two-stage annealing of the proxy.

Stage 1 (warmup + stable on the base mix) is trained once and reused; then every (candidate or baseline, seed)
anneal runs as its own Ray task with the resources it asks for, each evaluated on the reference sets and MMLU;
the decision rule turns the per-seed deltas into keep / reject / inconclusive, and a report is written.

    python -m pipelines.verify configs/verify-tiny.yaml [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from core.config import ConfigError
from core.io import canonical_json
from core.runtime import ensure_ray, gather
from core.storage import AnyPath, is_remote, location, mirror_dir, mirrored
from model.train import TrainConfig
from verification.anneal import AnnealRun, check_candidate_size, run_anneal
from verification.config import BASELINE, Candidate, Resources, VerificationConfig, load_verification_config
from verification.controls import control_for
from verification.decide import KEEP, Decision, decide
from verification.overlap import check_independence
from verification.report import write_report
from verification.stage1 import (
    Stage1Checkpoint,
    Stage1Mismatch,
    find_stage1,
    plan_stage1,
    source_fingerprint,
    train_stage1,
)


def use_assigned_cpus() -> None:
    """Torch intra-op threads = the CPUs Ray gave this task, so parallel tasks do not oversubscribe cores."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


# What the processes of a verification read from a work_dir on object storage (their local mirror gets these first):
# the driver, the stage-1 task and every anneal task (which adds its own run's directory, to resume it).
SHARED_WORK = ["stage1", "base_mix", "token_cache", "controls"]
DRIVER_WORK = [*SHARED_WORK, "document_hashes", "reports"]


def synced(store: str | None, only: list[str]) -> contextlib.AbstractContextManager:
    """With a remote work_dir (``store``), this process's local mirror of it, synced both ways around the work."""
    return mirrored(store, only) if store else contextlib.nullcontext()


@ray.remote
def stage1_task(train_config: TrainConfig, store: str | None) -> dict:
    use_assigned_cpus()
    with synced(store, SHARED_WORK):
        return train_stage1(train_config)


@ray.remote
def anneal_task(run: AnnealRun, config: VerificationConfig, stage1: Stage1Checkpoint, store: str | None) -> dict:
    use_assigned_cpus()
    own = Path(run.directory(config, stage1)).relative_to(Path(config.work_dir).resolve()).as_posix()
    with synced(store, [*SHARED_WORK, own]):
        return run_anneal(run, config, stage1)


def task_options(resources: Resources) -> dict:
    return {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "max_retries": 1}


def ensure_stage1(config: VerificationConfig, store: str | None = None) -> Stage1Checkpoint:
    """The stage-1 checkpoint for this base mix and config: reused when finished, else trained in one Ray task."""
    stage1 = find_stage1(config)
    if stage1 is None:
        plan = plan_stage1(config)
        stage1 = plan.finish(ray.get(stage1_task.options(**task_options(config.stage1.resources)).remote(
            plan.train_config, store)))
    return stage1


@dataclass(frozen=True)
class VerificationResult:
    decisions: dict[str, Decision]
    stage1: Stage1Checkpoint
    runs: list[dict]
    report_path: AnyPath
    seconds: float

    @property
    def kept(self) -> list[str]:
        return [name for name, d in self.decisions.items() if d.verdict == KEEP]


def verify(config: VerificationConfig, candidates: list[Candidate] | None = None) -> VerificationResult:
    """Verify config.candidates (or the given ones), each beside its own shuffled control, against the baseline
    anneal; Ray must be reachable.

    A ``work_dir`` on object storage is worked in through local mirrors (``core.storage.mirrored``), one per
    process and node at the same path, each synced with the store: the stage-1 checkpoint, token caches, anneal runs
    and the report end up on the store, and a re-run anywhere reuses them."""
    store = config.work_dir if is_remote(config.work_dir) else None
    with synced(store, DRIVER_WORK):
        local = config.model_copy(update={"work_dir": str(mirror_dir(store))}) if store else config
        result = _verify(local, candidates, store)
    if store:
        relative = result.report_path.relative_to(mirror_dir(store)).as_posix()
        result = dataclasses.replace(result, report_path=location(store) / relative)
    return result


def _verify(config: VerificationConfig, candidates: list[Candidate] | None, store: str | None) -> VerificationResult:
    started = time.perf_counter()
    candidates = config.candidates if candidates is None else candidates
    if not candidates:
        raise ValueError("nothing to verify: no candidates")
    check_independence(config, candidates)
    ensure_ray()
    stage1 = ensure_stage1(config, store)
    controls_dir = Path(config.work_dir).resolve() / "controls"
    controls = {c.name: control_for(c, source_fingerprint(c.path, c.text_column), controls_dir) for c in candidates}
    for candidate in [*candidates, *controls.values()]:
        check_candidate_size(config, candidate, stage1)
    runs = [AnnealRun.baseline(config, seed) for seed in config.anneal.seeds]
    runs += [AnnealRun.for_candidate(config, c, seed) for c in [*candidates, *controls.values()]
             for seed in config.anneal.seeds]
    refs = [anneal_task.options(**task_options(run.resources)).remote(run, config, stage1, store) for run in runs]
    records = gather(refs, "anneal", labels=[f"{run.name} seed {run.seed}" for run in runs])

    def units_of(name: str) -> dict[int, dict]:
        return {r["seed"]: r["units"] for r in records if r["name"] == name}

    decisions = {c.name: decide(c.name, units_of(c.name), units_of(BASELINE), units_of(controls[c.name].name),
                                config.decision) for c in candidates}
    report_key = hashlib.sha256(
        canonical_json([r["directory"] for r in records] + [config.decision.model_dump()]).encode()
    ).hexdigest()[:16]
    report_path = write_report(
        Path(config.work_dir).resolve() / "reports" / f"report-{report_key}",
        summary={
            "stage1": {"key": stage1.key, "checkpoint": str(stage1.checkpoint_dir), "reused": not stage1.trained,
                       "steps": stage1.record["steps"], "tokens": stage1.record["tokens"]},
            "candidates": [c.model_dump() for c in candidates],
            "controls": {name: control.model_dump() for name, control in controls.items()},
            "anneal": config.anneal.model_dump(),
            "decision_rule": config.decision.model_dump(),
        },
        runs=records,
        decisions=decisions,
        rule=config.decision,
    )
    return VerificationResult(decisions, stage1, records, report_path, time.perf_counter() - started)


def format_decisions(result: VerificationResult) -> str:
    lines = [f"stage 1 {result.stage1.key}: {'reused' if not result.stage1.trained else 'trained'}"]
    for name, decision in result.decisions.items():
        lines.append(f"{name:<24} {decision.verdict:<13} {decision.reason}")
    lines.append(f"report: {result.report_path} ({result.seconds:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.verify", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="verification YAML (see configs/verify-tiny.yaml)")
    parser.add_argument("--work-dir", help="override work_dir")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_verification_config(args.config)
        if args.work_dir:
            config = config.model_copy(update={"work_dir": args.work_dir})
        result = verify(config)
    except (ConfigError, FileNotFoundError, Stage1Mismatch, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_decisions(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
