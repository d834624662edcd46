"""Verdicts per candidate from paired-bootstrap confidence intervals of its improvement.

Seed s of a candidate, of its control and of the baseline start from the same stage-1 checkpoint with the same seed,
and all are evaluated on the same units (reference-set windows, MMLU items), so each unit's difference cancels what
the runs share. The interval of the mean improvement comes from a hierarchical bootstrap: resample the seeds, then
the units within each seed (a metric over several reference sets resamples each set and averages). Noise is
measured, never assumed, and a verdict is made only where the interval resolves it:

- keep: better than the baseline (interval above zero) and better than its own control (the same text shuffled
  within lines) by more than ``min_effect`` (interval above it): so the shuffled copy of any text is never kept. The
  margin over the control is needed because a control is one draw of the shuffling: two shuffles of a text differ a
  little, and the bootstrap, which resamples seeds and units, does not see that difference;
- reject: worse than the baseline (interval below zero), or no better than its own control by ``min_effect`` (the
  interval over the control ends below it): whatever it brings, its words alone bring too;
- underpowered: otherwise, when an interval is wider than 2 x ``min_effect``: the run cannot tell the smallest
  effect that matters from none (more evaluation sequences, seeds or anneal tokens would);
- inconclusive: resolved, and neither.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from verification.config import MEAN_REFERENCE_LOSS, MMLU_ACCURACY, DecisionConfig

KEEP, REJECT, INCONCLUSIVE, UNDERPOWERED = "keep", "reject", "inconclusive", "underpowered"


def higher_is_better(metric: str) -> bool:
    return metric == MMLU_ACCURACY


def improvement(metric: str, candidate: float, baseline: float) -> float:
    """Positive when the candidate is better: lower loss, or higher accuracy."""
    return candidate - baseline if higher_is_better(metric) else baseline - candidate


def unit_groups(metric: str, units: dict[str, list[float]]) -> list[np.ndarray]:
    """The unit values a metric averages: one group per reference set for the mean reference loss."""
    if metric == MEAN_REFERENCE_LOSS:
        return [np.asarray(values) for name, values in sorted(units.items()) if name.startswith("loss:")]
    return [np.asarray(units[metric])]


@dataclass(frozen=True)
class Interval:
    estimate: float  # mean improvement over seeds and units (positive = better)
    low: float
    high: float
    per_seed: dict[int, float]

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def paired_interval(metric: str, runs: dict[int, dict], references: dict[int, dict], rule: DecisionConfig,
                    seed: int = 0) -> Interval:
    """The improvement of ``runs`` over ``references`` (both: seed -> unit values by metric), with its bootstrap
    interval. Deterministic: the resampling generator is seeded."""
    seeds = sorted(runs)
    if seeds != sorted(references):
        raise ValueError(f"seeds {seeds} differ from the reference's {sorted(references)}")
    sign = 1.0 if higher_is_better(metric) else -1.0
    groups = len(unit_groups(metric, runs[seeds[0]]))  # deltas[group]: [seeds, units of that group]
    deltas = [np.stack([sign * (unit_groups(metric, runs[s])[g] - unit_groups(metric, references[s])[g])
                        for s in seeds]) for g in range(groups)]
    rng = np.random.default_rng(seed)
    n_seeds, resamples = len(seeds), rule.bootstrap
    chosen_seeds = rng.integers(n_seeds, size=(resamples, n_seeds))
    statistic = np.zeros(resamples)
    for group in deltas:
        n_units = group.shape[1]
        chosen_units = rng.integers(n_units, size=(resamples, n_seeds, n_units))
        statistic += group[chosen_seeds[:, :, None], chosen_units].mean(axis=(1, 2))
    statistic /= len(deltas)
    tail = (1 - rule.confidence) / 2
    per_seed = {s: float(np.mean([group[i].mean() for group in deltas])) for i, s in enumerate(seeds)}
    return Interval(float(np.mean(list(per_seed.values()))), float(np.quantile(statistic, tail)),
                    float(np.quantile(statistic, 1 - tail)), per_seed)


@dataclass(frozen=True)
class Decision:
    candidate: str
    verdict: str
    metric: str
    versus_baseline: Interval
    versus_control: Interval | None
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def decide(candidate: str, candidate_units: dict[int, dict], baseline_units: dict[int, dict],
           control_units: dict[int, dict] | None, rule: DecisionConfig) -> Decision:
    """The verdict for one candidate; ``*_units``: seed -> the run's unit values by metric."""
    if len(candidate_units) < 2:
        raise ValueError(f"{candidate}: {len(candidate_units)} seed(s); noise needs at least 2")
    metric = rule.metric
    baseline = paired_interval(metric, candidate_units, baseline_units, rule)
    control = paired_interval(metric, candidate_units, control_units, rule) if control_units is not None else None
    level = f"{rule.confidence:.0%}"

    def described(name: str, interval: Interval) -> str:
        return f"{interval.estimate:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}] vs {name}"

    summary = f"{metric} improvement ({level} interval) " + described("baseline", baseline) + (
        "; " + described("its control", control) if control is not None else "")
    if baseline.low > 0 and (control is None or control.low > rule.min_effect):
        verdict = KEEP
    elif baseline.high < 0:
        verdict = REJECT
    elif control is not None and control.high < rule.min_effect:
        verdict = REJECT
        summary += f"; no better than its control by {rule.min_effect}: only its words help"
    elif baseline.half_width > rule.min_effect or (control is not None and control.half_width > rule.min_effect):
        verdict = UNDERPOWERED
        summary += f"; intervals wider than 2 x min_effect ({rule.min_effect}) cannot resolve it"
    else:
        verdict = INCONCLUSIVE
    return Decision(candidate, verdict, metric, baseline, control, summary)
