"""``python -m pipelines.ultraclean``: the UltraClean job, locally or under ``ray job submit``.

    python -m pipelines.ultraclean [run] [--config configs/x.yaml] [--output DIR]  # the config's `steps` in order
    python -m pipelines.ultraclean ingest|train-classifier|score|select --config X  # one step alone
        score/select: [--version DIR] (default: the config's input, else output.root's latest)
        score:        [--classifier DIR] (default: scoring.classifier, else classifier.output_root's latest)
    python -m pipelines.ultraclean verify-seeds|verify-output --config X            # annealing verification alone
    python -m pipelines.ultraclean verify DIR                                       # re-check a version's checksums
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError
from core.manifest import verify_version
from core.runtime import TasksFailed
from core.storage import AnyPath, location
from core.versions import DatasetVersion
from pipelines.config import STEP_ORDER, UltraCleanConfig, load_config
from pipelines.derived import StepResult
from pipelines.ingest import IngestResult, run_ingest
from pipelines.score import score_version
from pipelines.selection import select_version
from pipelines.verify import format_decisions, verify
from stages.classifier import (
    ClassifierConfig,
    ClassifierError,
    train_classifier,
)
from stages.seeds import SeedPoolError
from verification.anneal import CandidateTooSmall
from verification.config import Candidate
from verification.decide import UNDERPOWERED

COMMAND_STEPS = {
    "ingest": "ingest",
    "verify-seeds": "verify_seeds",
    "train-classifier": "train_classifier",
    "score": "score",
    "select": "select",
    "verify-output": "verify_output",
}


class VerificationRejected(ValueError):
    """Verification kept none of the positive seed sources, or could not decide: nothing trustworthy to train on."""


def seed_candidates(config: UltraCleanConfig, base_dir: Path) -> list[Candidate]:
    """One verification candidate per positive seed source, named after its file."""
    candidates: list[Candidate] = []
    for source in config.classifier.seeds.positive.sources:
        path = Path(source.path) if Path(source.path).is_absolute() else (base_dir / source.path).resolve()
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.name.split(".")[0]).strip("-.") or "seeds"
        if name in {c.name for c in candidates}:
            name = f"{name}-{len(candidates)}"
        candidates.append(Candidate(name=name, path=str(path), text_column=source.text_key or "content"))
    return candidates


def verify_seed_sources(config: UltraCleanConfig, base_dir: Path) -> ClassifierConfig:
    """Anneal-verify every positive seed source; the classifier config that comes back trains on the kept ones."""
    candidates = seed_candidates(config, base_dir)
    result = verify(config.verification.resolve_paths(base_dir), candidates)
    print(format_decisions(result))
    underpowered = [name for name, decision in result.decisions.items() if decision.verdict == UNDERPOWERED]
    if underpowered:
        raise VerificationRejected(
            f"verification could not decide on the seed sources {underpowered}: their intervals are wider than "
            f"2 x decision.min_effect ({config.verification.decision.min_effect}), so training on them would be "
            "training on unverified seeds; give the verification more power (evaluation max_sequences, anneal "
            f"decay_steps or seeds, a larger proxy) or a larger min_effect; see {result.report_path}")
    sources = config.classifier.seeds.positive.sources
    kept = [source for source, candidate in zip(sources, candidates) if candidate.name in result.kept]
    if not kept:
        raise VerificationRejected(f"verification kept none of the positive seed sources "
                                   f"{[c.name for c in candidates]}; see {result.report_path}")
    seeds = config.classifier.seeds
    positive = seeds.positive.model_copy(update={"sources": kept})
    return config.classifier.model_copy(update={"seeds": seeds.model_copy(update={"positive": positive})})


def format_summary(result: IngestResult) -> str:
    manifest = result.manifest
    lines = [f"{'stage':<26}{'in':>9}{'out':>9}{'dropped':>9}{'quar.':>7}{'sec':>8}  top reasons"]
    for row in manifest["stages"]:
        reasons = sorted(row["dropped"].items(), key=lambda kv: -kv[1])[:3]
        seconds = result.stage_seconds.get(row["stage"], 0.0)
        lines.append(
            f"{row['stage']:<26}{row['in']:>9}{row['out']:>9}{sum(row['dropped'].values()):>9}{row['quarantined']:>7}"
            f"{seconds:>8.2f}  {', '.join(f'{k}={v}' for k, v in reasons)}"
        )
    accounting = manifest["accounting"]
    throughput = accounting["records_in"] / result.seconds if result.seconds else 0.0
    lines.append(
        f"{accounting['records_in']} records in: {accounting['kept']} kept, {accounting['dropped']} dropped, "
        f"{accounting['quarantined']} quarantined ({accounting['quarantine_entries']} quarantine entries); "
        f"{result.seconds:.1f} s wall, {throughput:.1f} records/s"
    )
    return "\n".join(lines)


def format_step(result: StepResult) -> str:
    row = result.manifest["stages"][0]
    reasons = ", ".join(f"{k}={v}" for k, v in row["dropped"].items()) or "-"
    return f"{row['stage']}: {row['in']} in, {row['out']} out, dropped {reasons}; {result.seconds:.1f} s"


@dataclass
class StepRun:
    """What the steps of one run hand on: the dataset version and classifier the next step reads."""

    config: UltraCleanConfig
    base_dir: Path
    output: AnyPath | None
    version: AnyPath | None
    classifier: AnyPath | None
    classifier_config: ClassifierConfig | None

    @property
    def version_or_root(self) -> AnyPath:
        return self.version or self.output or location(self.config.output.root)


def _ingest(run: StepRun) -> None:
    result = run_ingest(run.config, run.base_dir, run.output)
    print("nothing to do: version already complete" if result.reused else format_summary(result))
    run.version = result.version_path


def _verify_seeds(run: StepRun) -> None:
    if run.config.verification is None or run.config.classifier is None:
        raise ConfigError("verification: verify-seeds needs a verification section and a classifier section")
    run.classifier_config = verify_seed_sources(run.config, run.base_dir)


def _train_classifier(run: StepRun) -> None:
    if run.classifier_config is None:
        raise ConfigError("classifier: train-classifier needs a classifier section with seed pools")
    trained = train_classifier(run.classifier_config, run.base_dir)
    print(f"classifier {trained.path.name}{' (reused)' if trained.reused else ''}:")
    for language, entry in trained.metadata["languages"].items():
        metrics = entry["metrics"]
        print(f"  {language}: held-out ROC-AUC {metrics['roc_auc']:.3f}, precision {metrics['precision']:.3f}, "
              f"recall {metrics['recall']:.3f}, F1 {metrics['f1']:.3f} ({metrics['positives']} + "
              f"{metrics['negatives']} held-out documents)")
    for language, counts in trained.metadata["skipped_languages"].items():
        print(f"  {language}: no classifier (seed documents: {counts['positive']} positive, "
              f"{counts['negative']} negative; both pools need 2)")
    print(f"classifier: {trained.path}")
    run.classifier = trained.path


def _score(run: StepRun) -> None:
    config = run.config
    if run.classifier is None:
        if config.scoring.classifier:
            run.classifier = location(config.scoring.classifier)
        elif config.classifier is not None:
            run.classifier = location(config.classifier.output_root)
        else:
            raise ConfigError("scoring.classifier: no classifier to score with (set it, pass --classifier, "
                              "or add a classifier section and train one)")
    result = score_version(config, run.version_or_root, run.classifier, run.output)
    print(("reused " if result.reused else "") + format_step(result))
    run.version = result.version_path


def _select(run: StepRun) -> None:
    result = select_version(run.config, run.version_or_root, run.output)
    print(("reused " if result.reused else "") + format_step(result))
    run.version = result.version_path


def _verify_output(run: StepRun) -> None:
    if run.config.verification is None:
        raise ConfigError("verification: verify-output needs a verification section")
    target = DatasetVersion.open(run.version_or_root).path
    try:
        result = verify(run.config.verification.resolve_paths(run.base_dir),
                        [Candidate(name="selected-output", path=str(target))])
    except CandidateTooSmall as error:  # the version is published; only its check could not run
        print(f"verify-output: not verified: {error}")
        return
    print(format_decisions(result))


STEPS: dict[str, Callable[[StepRun], None]] = {
    "ingest": _ingest,
    "verify_seeds": _verify_seeds,
    "train_classifier": _train_classifier,
    "score": _score,
    "select": _select,
    "verify_output": _verify_output,
}


def run_steps(config: UltraCleanConfig, base_dir: Path, steps: list[str], output: AnyPath | None = None,
              version: AnyPath | None = None, classifier: AnyPath | None = None) -> AnyPath | None:
    """Run the steps in pipeline order, each feeding the next; returns the last dataset version written."""
    if version is None:
        configured = {"score": config.scoring.input, "select": config.select.input if config.select else None}
        first = next((s for s in STEP_ORDER if s in steps and s in configured), None)
        if first and configured[first]:
            version = location(configured[first])
    run = StepRun(config, base_dir, output, version, classifier, config.classifier)
    for step in STEP_ORDER:
        if step in steps:
            STEPS[step](run)
            if step in ("ingest", "score", "select"):
                print(f"dataset version: {run.version}")
    return run.version


def _run(argv: list[str], command: str = "run") -> int:
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.ultraclean {command}",
                                     description="Run the UltraClean job (or one step of it).")
    parser.add_argument("--config", help="YAML config (default: the embedded configs/default.yaml)")
    parser.add_argument("--output", help="dataset root, overriding output.root")
    if command in ("score", "select", "verify-output"):
        parser.add_argument("--version", help="dataset version (or root) to read, overriding the config")
    if command == "score":
        parser.add_argument("--classifier", help="classifier directory (or root), overriding scoring.classifier")
    args = parser.parse_args(argv)
    config, base_dir = load_config(args.config)
    steps = config.steps if command == "run" else [COMMAND_STEPS[command]]
    if command == "select" and config.select is None:
        raise ConfigError("select: the select step needs a select section (threshold or top_fraction)")
    version = getattr(args, "version", None)
    classifier = getattr(args, "classifier", None)
    run_steps(config, base_dir, steps, location(args.output) if args.output else None,
              location(version) if version else None, location(classifier) if classifier else None)
    return 0


def verify_main(argv: list[str], prog: str = "python -m pipelines.ultraclean verify") -> int:
    """Re-check a version's files against its manifest; print the problems; exit code 1 when anything is wrong."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("version", help="a version directory, or a dataset root (checks its latest version)")
    args = parser.parse_args(argv)
    problems = verify_version(args.version)
    for problem in problems:
        print(f"FAILED {problem}")
    print(f"{args.version}: {'corrupt' if problems else 'intact'}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["verify"]:
            return verify_main(argv[1:])
        if argv[:1] and argv[0] in ("run", *COMMAND_STEPS):
            return _run(argv[1:], argv[0])
        return _run(argv)
    except (ConfigError, FileNotFoundError, ClassifierError, SeedPoolError, VerificationRejected) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TasksFailed as error:
        print(f"error: {error}\nnothing was published; the finished work is kept, so a re-run resumes",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
