"""keep / reject / inconclusive per candidate, from paired per-seed deltas against the baseline anneal.

Seed s of a candidate and seed s of the baseline share the stage-1 checkpoint and the seed, so their difference
cancels what the two runs have in common; the spread of those differences across seeds is the noise the effect
must clear (measured, never assumed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from verification.config import MMLU_ACCURACY, DecisionConfig

KEEP, REJECT, INCONCLUSIVE = "keep", "reject", "inconclusive"


def higher_is_better(metric: str) -> bool:
    return metric == MMLU_ACCURACY


def improvement(metric: str, candidate: float, baseline: float) -> float:
    """Positive when the candidate is better: lower loss, or higher accuracy."""
    return candidate - baseline if higher_is_better(metric) else baseline - candidate


@dataclass(frozen=True)
class Decision:
    candidate: str
    verdict: str
    metric: str
    improvements: dict[int, float]  # per seed, in the metric's unit; positive = better than the baseline
    mean: float
    std: float  # sample standard deviation across seeds
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def decide(
    candidate: str,
    candidate_metrics: dict[int, dict[str, float]],
    baseline_metrics: dict[int, dict[str, float]],
    rule: DecisionConfig,
) -> Decision:
    seeds = sorted(candidate_metrics)
    if seeds != sorted(baseline_metrics):
        raise ValueError(f"{candidate}: seeds {seeds} differ from the baseline's {sorted(baseline_metrics)}")
    if len(seeds) < 2:
        raise ValueError(f"{candidate}: {len(seeds)} seed(s); noise needs at least 2")
    metric = rule.metric
    gains = {s: improvement(metric, candidate_metrics[s][metric], baseline_metrics[s][metric]) for s in seeds}
    values = np.array([gains[s] for s in seeds])
    mean, std = float(values.mean()), float(values.std(ddof=1))
    margin = rule.spread_multiple * std
    summary = (
        f"{metric}: mean improvement {mean:+.4f} over {len(seeds)} seeds (std {std:.4f}; "
        f"needs every seed beyond {rule.min_effect} and |mean| > {rule.spread_multiple} std = {margin:.4f})"
    )
    if values.min() > rule.min_effect and mean > margin:
        verdict = KEEP
    elif values.max() < -rule.min_effect and -mean > margin:
        verdict = REJECT
    else:  # also a NaN metric: every comparison with NaN is false
        verdict = INCONCLUSIVE
    return Decision(candidate, verdict, metric, gains, mean, std, summary)
