"""The verification report: report.json, anneal_curves.png (training loss of every anneal), deltas.png (per-metric
improvement over the baseline, mean with a one-standard-deviation error bar across seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.figures import save_figure
from core.io import atomic_write_text
from verification.config import BASELINE
from verification.decide import Decision, improvement

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


def plot_deltas(deltas: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = sorted(deltas)
    metrics = sorted({m for per in deltas.values() for m in per})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        means = [deltas[c][metric]["mean"] for c in candidates]
        stds = [deltas[c][metric]["std"] for c in candidates]
        ax.bar(range(len(candidates)), means, yerr=stds, capsize=4,
               color=["tab:green" if m > 0 else "tab:red" for m in means])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(candidates)), candidates, rotation=30, ha="right")
        ax.set_title(metric, fontsize=9)
    axes[0][0].set_ylabel("improvement over baseline (+ = better)")
    save_figure(fig, path)


def write_report(
    directory: str | Path, *, summary: dict, runs: list[dict], decisions: dict[str, Decision]
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    runs = sorted(runs, key=lambda r: (r["name"] != BASELINE, r["name"], r["seed"]))
    deltas = metric_deltas(runs)
    report = {
        **summary,
        "decisions": {name: d.as_dict() for name, d in sorted(decisions.items())},
        "deltas": deltas,
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
        "curves": {f"{r['name']}/seed{r['seed']}": r["curve"] for r in runs},
    }
    atomic_write_text(directory / REPORT_NAME, json.dumps(report, indent=1, default=str))
    plot_curves(runs, directory / CURVES_NAME)
    if deltas:
        plot_deltas(deltas, directory / DELTAS_NAME)
    return directory / REPORT_NAME
