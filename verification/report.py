"""The verification report: report.json (decisions with their intervals, per-metric improvements of every run,
the runs without their unit values), anneal_curves.png (training loss of every anneal), deltas.png (per candidate:
its improvement over the baseline beside its control's, and over its control, each with its bootstrap interval).
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np

from core.figures import save_figure
from core.io import atomic_write_text
from verification.config import BASELINE, DecisionConfig
from verification.controls import CONTROL_SUFFIX
from verification.decide import Decision, Interval, improvement, paired_interval

REPORT_NAME = "report.json"
CURVES_NAME = "anneal_curves.png"
DELTAS_NAME = "deltas.png"


def metric_deltas(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """candidate -> metric -> {per_seed, mean, std}: improvement over the same seed's baseline, every metric."""
    baseline = {r["seed"]: r["metrics"] for r in runs if r["name"] == BASELINE}
    deltas: dict[str, dict[str, dict]] = {}
    for run in runs:
        if run["name"] == BASELINE:
            continue
        for metric, value in run["metrics"].items():
            entry = deltas.setdefault(run["name"], {}).setdefault(metric, {"per_seed": {}})
            entry["per_seed"][run["seed"]] = improvement(metric, value, baseline[run["seed"]][metric])
    for metrics in deltas.values():
        for entry in metrics.values():
            values = np.array(list(entry["per_seed"].values()))
            entry["mean"] = float(values.mean())
            entry["std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return deltas



def plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["name"] for r in runs}, key=lambda n: (n != BASELINE, n))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in sorted(runs, key=lambda r: (r["name"], r["seed"])):
        steps = [p["step"] for p in run["curve"]]
        losses = [p["loss"] for p in run["curve"]]
        label = run["name"] if run["seed"] == min(r["seed"] for r in runs if r["name"] == run["name"]) else None
        ax.plot(steps, losses, color=colours[run["name"]], lw=1, alpha=0.8, label=label)
    ax.set_xlabel("anneal step (decay phase, from the stage-1 checkpoint)")
    ax.set_ylabel("training loss on the anneal mix (nats/token)")
    ax.set_title("annealing loss curves, one line per seed")
    ax.legend()
    save_figure(fig, path)


def control_intervals(runs: list[dict], decisions: dict[str, Decision], rule: DecisionConfig) -> dict[str, Interval]:
    """Each candidate's control against the baseline, on the decision metric (shown beside the candidate)."""
    units = {}
    for run in runs:
        units.setdefault(run["name"], {})[run["seed"]] = run["units"]
    return {name: paired_interval(rule.metric, units[name + CONTROL_SUFFIX], units[BASELINE], rule)
            for name in decisions if name + CONTROL_SUFFIX in units}


def plot_decisions(decisions: dict[str, Decision], controls: dict[str, Interval], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(decisions)
    fig, ax = plt.subplots(figsize=(2.4 * len(names) + 2.5, 4.5))
    bars = (("vs baseline", "tab:blue", lambda n: decisions[n].versus_baseline),
            ("its control vs baseline", "tab:grey", lambda n: controls.get(n)),
            ("vs its control", "tab:orange", lambda n: decisions[n].versus_control))
    for offset, (label, colour, interval_of) in zip((-0.27, 0.0, 0.27), bars):
        xs, ys, errors = [], [], [[], []]
        for i, name in enumerate(names):
            interval = interval_of(name)
            if interval is not None:
                xs.append(i + offset)
                ys.append(interval.estimate)
                errors[0].append(interval.estimate - interval.low)
                errors[1].append(interval.high - interval.estimate)
        ax.bar(xs, ys, width=0.25, yerr=errors, capsize=4, color=colour, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), [f"{n}\n{decisions[n].verdict}" for n in names])
    metric = decisions[names[0]].metric
    ax.set_ylabel(f"improvement in {metric} (+ = better)")
    ax.set_title("improvement with its bootstrap interval")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_report(
    directory: str | Path, *, summary: dict, runs: list[dict], decisions: dict[str, Decision], rule: DecisionConfig
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    runs = sorted(runs, key=lambda r: (r["name"] != BASELINE, r["name"], r["seed"]))
    controls = control_intervals(runs, decisions, rule)
    report = {
        **summary,
        "decisions": {name: d.as_dict() for name, d in sorted(decisions.items())},
        "controls_vs_baseline": {name: interval for name, interval in sorted(controls.items())},
        "deltas": metric_deltas(runs),
        "runs": [{k: v for k, v in r.items() if k not in ("curve", "units")} for r in runs],
        "curves": {f"{r['name']}/seed{r['seed']}": r["curve"] for r in runs},
    }
    atomic_write_text(directory / REPORT_NAME, json.dumps(report, indent=1, default=_plain))
    plot_curves(runs, directory / CURVES_NAME)
    if decisions:
        plot_decisions(decisions, controls, directory / DELTAS_NAME)
    return directory / REPORT_NAME


def _plain(value):
    return asdict(value) if is_dataclass(value) else str(value)
