"""What a synthesis run produced, per family, before anyone trains on it: ``quality.json`` and ``quality.png``.

Two kinds of figures. Checks over every *generated* dialogue (filled per part, merged with ``+``): answers against
the gold answer (reasoning), grounding in the passage (knowledge), constraint satisfaction per kind (instruction),
tool-call validity (tool use); they say how well the model does the task, whatever the filters then drop. Figures
over the *kept* dialogues, the version's rows: pass rate of each stage with its reasons, turns per dialogue,
assistant reply lengths, distinct-n and self-similarity of the assistant text across dialogues.

distinct-n: distinct word n-grams / all word n-grams over the family's assistant replies (n-grams never cross a
reply's end; words are lower-cased ``\\w+`` runs). Self-similarity: Jaccard similarity of the sets of word trigrams
of two dialogues' assistant text, averaged over all pairs and, per dialogue, its nearest other dialogue; on the first
SIMILARITY_SAMPLE kept dialogues of a family, in seed order.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.accounting import Accounting
from core.figures import save_figure
from core.io import atomic_write_text, canonical_json
from core.manifest import stage_table
from core.storage import AnyPath
from sft_synth.config import FiltersConfig
from sft_synth.constraints import violated
from sft_synth.filters import answer_problem, grounding, tool_call_problem

QUALITY_JSON = "quality.json"
QUALITY_PNG = "quality.png"
DISTINCT_N = (1, 2, 3)
SIMILARITY_SAMPLE = 1000
# Assistant reply length bins in characters: [edge_i, edge_i+1), the last one open.
LENGTH_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_WORD = re.compile(r"\w+")


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


@dataclass
class GenerationChecks:
    """Task checks over the generated dialogues of one family; parts add up with +."""

    dialogues: int = 0
    answers: Counter = field(default_factory=Counter)  # correct / answer_wrong / answer_missing
    grounding_sum: float = 0.0
    grounding_checked: int = 0
    grounding_below: int = 0
    constraints: Counter = field(default_factory=Counter)  # "<kind>" checked, "<kind>:ok" satisfied, "all", "all:ok"
    tool_calls: Counter = field(default_factory=Counter)  # "valid" or the problem

    def __add__(self, other: GenerationChecks) -> GenerationChecks:
        return GenerationChecks(
            self.dialogues + other.dialogues, self.answers + other.answers,
            self.grounding_sum + other.grounding_sum, self.grounding_checked + other.grounding_checked,
            self.grounding_below + other.grounding_below, self.constraints + other.constraints,
            self.tool_calls + other.tool_calls,
        )

    def add(self, record: dict, filters: FiltersConfig) -> None:
        self.dialogues += 1
        family, messages = record["family"], record["messages"]
        answers = [m["content"] for m in messages if m["role"] == "assistant" and m["content"]]
        if family == "reasoning" and (record["source_seed"] or {}).get("answer"):
            self.answers[answer_problem(record, filters.answers.relative_tolerance) or "correct"] += 1
        if family == "knowledge":
            overlap = grounding(" ".join(answers), record["source_seed"]["text"])
            self.grounding_sum += overlap
            self.grounding_checked += 1
            self.grounding_below += overlap < filters.grounding.min_overlap
        if record["constraints"]:
            constraints = json.loads(record["constraints"])
            broken = set(violated(answers[0] if answers else "", constraints))
            for constraint in constraints:
                self.constraints[constraint["kind"]] += 1
                self.constraints[f"{constraint['kind']}:ok"] += constraint["kind"] not in broken
            self.constraints["all"] += 1
            self.constraints["all:ok"] += not broken
        if family == "tool_use":
            self.tool_calls[tool_call_problem(record) or "valid"] += 1

    def as_dict(self) -> dict:
        report: dict = {}
        if self.answers:
            checked = sum(self.answers.values())
            report["answers"] = {"checked": checked, "correct": self.answers["correct"],
                                 "wrong": self.answers["answer_wrong"], "missing": self.answers["answer_missing"],
                                 "accuracy": _rate(self.answers["correct"], checked)}
        if self.grounding_checked:
            report["grounding"] = {"checked": self.grounding_checked,
                                   "mean_overlap": round(self.grounding_sum / self.grounding_checked, 6),
                                   "below_threshold": self.grounding_below}
        if self.constraints:
            kinds = sorted(k for k in self.constraints if ":" not in k and k != "all")
            report["constraints"] = {
                "dialogues": self.constraints["all"], "all_satisfied": self.constraints["all:ok"],
                "rate": _rate(self.constraints["all:ok"], self.constraints["all"]),
                "by_kind": {k: {"checked": self.constraints[k], "satisfied": self.constraints[f"{k}:ok"],
                                "rate": _rate(self.constraints[f"{k}:ok"], self.constraints[k])} for k in kinds},
            }
        if self.tool_calls:
            total = sum(self.tool_calls.values())
            report["tool_calls"] = {"dialogues": total, "valid": self.tool_calls["valid"],
                                    "rate": _rate(self.tool_calls["valid"], total),
                                    "problems": dict(sorted((k, v) for k, v in self.tool_calls.items()
                                                            if k != "valid"))}
        return report


def part_checks(records: list[dict], filters: FiltersConfig) -> GenerationChecks:
    checks = GenerationChecks()
    for record in records:
        checks.add(record, filters)
    return checks


def assistant_replies(dialogue: dict) -> list[str]:
    return [m["content"] for m in dialogue["messages"] if m["role"] == "assistant" and m["content"]]


def distinct_n(replies: list[str], n: int) -> float | None:
    """Distinct word n-grams / all word n-grams over the replies (None when there is no n-gram)."""
    grams = []
    for reply in replies:
        words = _WORD.findall(reply.lower())
        grams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return _rate(len(set(grams)), len(grams))


def self_similarity(dialogues: list[dict]) -> dict:
    """Mean pairwise and mean nearest-neighbour Jaccard similarity of the dialogues' word-trigram sets.

    Intersections for all pairs at once, as the sparse product B @ B.T of the dialogue x trigram incidence matrix
    (at 1000 dialogues of 200 words, 2 s where set operations pair by pair take 28 s, same figures)."""
    import torch

    sample = dialogues[:SIMILARITY_SAMPLE]
    ids: dict[tuple[str, ...], int] = {}
    rows, columns = [], []
    for row, dialogue in enumerate(sample):
        grams = set()
        for reply in assistant_replies(dialogue):
            words = _WORD.findall(reply.lower())
            grams.update(ids.setdefault(tuple(words[i : i + 3]), len(ids)) for i in range(len(words) - 2))
        rows += [row] * len(grams)
        columns += sorted(grams)
    n = len(sample)
    if n < 2:
        return {"dialogues": n, "mean_jaccard": None, "mean_nearest_jaccard": None}
    incidence = torch.sparse_coo_tensor(torch.tensor([rows, columns], dtype=torch.long).reshape(2, -1),
                                        torch.ones(len(rows), dtype=torch.float64), (n, max(len(ids), 1)),
                                        check_invariants=True)
    with warnings.catch_warnings():  # torch says its sparse product goes through CSR, "in beta"; the test checks it
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        shared = torch.sparse.mm(incidence, incidence.t()).to_dense()
    sizes = torch.bincount(torch.tensor(rows, dtype=torch.long), minlength=n).double()
    union = sizes[:, None] + sizes[None, :] - shared
    jaccard = torch.where(union > 0, shared / union.clamp(min=1), torch.zeros((), dtype=torch.float64))
    upper = torch.triu_indices(n, n, 1)
    nearest = jaccard.fill_diagonal_(-1.0).max(dim=1).values
    return {"dialogues": n, "mean_jaccard": round(jaccard[upper[0], upper[1]].mean().item(), 6),
            "mean_nearest_jaccard": round(nearest.mean().item(), 6)}


def kept_figures(dialogues: list[dict]) -> dict:
    """Shape and diversity of a family's kept dialogues."""
    replies = [reply for dialogue in dialogues for reply in assistant_replies(dialogue)]
    turns = Counter(sum(m["role"] == "user" for m in dialogue["messages"]) for dialogue in dialogues)
    bins = np.searchsorted(LENGTH_EDGES, [len(reply) for reply in replies], side="right") - 1
    return {
        "turns": {str(k): turns[k] for k in sorted(turns)},
        "assistant_chars": {"edges": list(LENGTH_EDGES),
                            "counts": np.bincount(bins, minlength=len(LENGTH_EDGES)).tolist()},
        "distinct": {str(n): distinct_n(replies, n) for n in DISTINCT_N},
        "self_similarity": self_similarity(dialogues),
    }


def quality_report(families: list[str], accounting: dict[str, Accounting], stage_order: list[str],
                   checks: dict[str, GenerationChecks], kept: list[dict]) -> dict:
    """Per family: the stage table with pass rates, the task checks over generated dialogues, the kept figures."""
    report = {}
    for family in families:
        stages = stage_table(accounting.get(family, Accounting()), stage_order)
        rows = [r for r in kept if r["family"] == family]
        report[family] = {
            "seeds": stages[0]["in"] if stages else 0,
            "generated": checks[family].dialogues if family in checks else 0,
            "kept": len(rows),
            "stages": [{"stage": s["stage"], "in": s["in"], "out": s["out"], "pass_rate": _rate(s["out"], s["in"]),
                        "dropped": s["dropped"]} for s in stages],
            **(checks[family].as_dict() if family in checks else {}),
            **kept_figures(rows),
        }
    return {"families": report}


def plot_quality(report: dict, path: Path) -> None:
    """One row per family: stage pass rates, turns per dialogue, assistant reply lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(report["families"])
    fig, axes = plt.subplots(len(families), 3, figsize=(13, 2.6 * len(families)), squeeze=False)
    for row, family in zip(axes, families):
        data = report["families"][family]
        stages = [s for s in data["stages"] if s["in"]]
        row[0].barh([s["stage"] for s in stages], [s["pass_rate"] for s in stages], color="tab:green")
        row[0].set_xlim(0, 1)
        row[0].invert_yaxis()
        distinct = ", ".join(f"d{n}={v:.2f}" for n, v in data["distinct"].items() if v is not None)
        row[0].set_title(f"{family}: pass rate per stage ({data['kept']} kept of {data['seeds']}) {distinct}",
                         fontsize=9)
        turns = data["turns"]
        row[1].bar(list(turns), list(turns.values()), color="tab:blue")
        row[1].set_title("user turns per kept dialogue", fontsize=9)
        counts = data["assistant_chars"]["counts"]
        labels = [f"{e}+" if i == len(counts) - 1 else str(e) for i, e in enumerate(data["assistant_chars"]["edges"])]
        row[2].bar(range(len(counts)), counts, color="tab:orange")
        row[2].set_xticks(range(len(counts)), labels, rotation=45, fontsize=7)
        row[2].set_title("assistant reply length (characters, bin start)", fontsize=9)
    save_figure(fig, path)


def write_quality(report: dict, directory: AnyPath) -> list[AnyPath]:
    atomic_write_text(directory / QUALITY_JSON, canonical_json(report))
    plot_quality(report, directory / QUALITY_PNG)
    return [directory / QUALITY_JSON, directory / QUALITY_PNG]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def quality_section(report: dict) -> str:
    """The dataset card's summary of quality.json."""
    lines = ["## Quality (`quality.json`, `quality.png`)",
             ("| family | seeds | kept | pass rates below 100% | rejections | task checks on generated dialogues | "
             "distinct-1/2/3 | self-similarity (mean / nearest) |"),
             "|---|---|---|---|---|---|---|---|"]
    for family, data in report["families"].items():
        rates = ", ".join(f"{s['stage']} {_percent(s['pass_rate'])}" for s in data["stages"]
                          if s["in"] and s["out"] < s["in"]) or "all 100%"
        reasons = Counter()
        for stage in data["stages"]:
            reasons.update(stage["dropped"])
        rejections = ", ".join(f"{k}: {v}" for k, v in reasons.most_common()) or "-"
        checks = []
        if "answers" in data:
            a = data["answers"]
            checks.append(f"answers correct {_percent(a['accuracy'])} ({a['wrong']} wrong, {a['missing']} no number)")
        if "grounding" in data:
            checks.append(f"grounding overlap {data['grounding']['mean_overlap']:.2f} "
                          f"({data['grounding']['below_threshold']} below threshold)")
        if "constraints" in data:
            checks.append(f"constraints all met {_percent(data['constraints']['rate'])}")
        if "tool_calls" in data:
            checks.append(f"tool calls valid {_percent(data['tool_calls']['rate'])}")
        distinct = "/".join("-" if v is None else f"{v:.2f}" for v in data["distinct"].values())
        similarity = data["self_similarity"]
        similar = ("-" if similarity["mean_jaccard"] is None
                   else f"{similarity['mean_jaccard']:.3f} / {similarity['mean_nearest_jaccard']:.3f}")
        lines.append(f"| {family} | {data['seeds']} | {data['kept']} | {rates} | {rejections} | "
                     f"{'; '.join(checks) or '-'} | {distinct} | {similar} |")
    return "\n".join(lines)
