"""Trains the line model of ``resiliparse_classified`` (stages/models/extract_lines.json) on the dev pages only
(a developer tool: the model file ships, this script does not).

Each dev page of benchmarks/extract.py's fixed split is cut into lines as the engine cuts it (``page_lines``). A line
is main text if a `with` snippet of the page's annotation falls in it, boilerplate if a `without` snippet does
(these lines weigh SNIPPET_WEIGHT), and otherwise main text exactly when trafilatura's full-mode output holds it.
Gradient-boosted trees of equal depth (Newton steps on the logistic loss, splits searched on quantile bins) fit those
labels. Five folds over the dev pages choose the score a line must reach (the best snippet F1 out of fold) and the
hybrid's unsure cut (the share of a page's text scored near that threshold, above which FALLBACK_SHARE of the dev
pages go to trafilatura); then the trees are fit on all dev pages. Held-out pages are never read. The same data give
the same file: no randomness, JSON written with sorted keys.

    python tools/train_extract_lines.py [--out stages/models/extract_lines.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.extract import annotated_pages, is_held_out, scores, snippet_counts
from core.io import atomic_path
from stages.extract import (
    BOILERPLATE_ELEMENTS,
    LINE_FEATURES,
    LINE_MODEL,
    ExtractConfig,
    TrafilaturaEngine,
    page_lines,
    tree_scores,
    unsure_share,
)

SNIPPET_WEIGHT = 10.0  # an annotated line against one labelled from trafilatura's output
TREES, DEPTH, LEARNING_RATE, BINS, L2, MIN_LEAF_WEIGHT = 100, 3, 0.1, 32, 1.0, 5.0
FOLDS = 5
THRESHOLDS = (-1.0, -0.5, 0.0, 0.5, 1.0)
UNSURE_MARGIN = 1.0  # a line scored within this of the threshold is one the model is unsure of
FALLBACK_SHARE = 0.05  # of pages handed to trafilatura: about what 5x trafilatura's speed leaves room for


def labelled_lines(entry: dict, texts: list[str], reference: str) -> tuple[np.ndarray, np.ndarray]:
    """(label, weight) of each line: snippets first, trafilatura's output where none falls in the line."""
    reference = " ".join(reference.split())
    labelled = []
    for text in texts:
        if any(snippet in text for snippet in entry["with"]):
            labelled.append((1.0, SNIPPET_WEIGHT))
        elif any(snippet in text for snippet in entry["without"]):
            labelled.append((0.0, SNIPPET_WEIGHT))
        else:
            labelled.append((float(text in reference), 1.0))
    labels, weights = np.array(labelled).reshape(len(texts), 2).T
    return labels, weights


def fit_trees(features: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict:
    """Boosted complete trees of depth DEPTH; node k splits on ``feature <= threshold`` into 2k+1 and 2k+2."""
    rows, columns = features.shape
    edges = [np.unique(np.quantile(features[:, c], np.linspace(0, 1, BINS + 1)[1:-1])) for c in range(columns)]
    binned = np.stack([np.searchsorted(edges[c], features[:, c]) for c in range(columns)], axis=1)
    flat_bins = binned + np.arange(columns) * (BINS + 1)  # one bincount for all columns
    usable = np.arange(BINS + 1)[None, :] < np.array([len(e) for e in edges])[:, None]
    base = float(np.log((weights * labels).sum() / (weights * (1 - labels)).sum()))
    score = np.full(rows, base)
    nodes = 2**DEPTH - 1
    split_features = np.zeros((TREES, nodes), dtype=np.int64)
    thresholds = np.zeros((TREES, nodes))
    leaves = np.zeros((TREES, nodes + 1))
    for tree in range(TREES):
        probability = 1 / (1 + np.exp(-score))
        gradient, hessian = weights * (probability - labels), weights * probability * (1 - probability)
        node = np.zeros(rows, dtype=np.int64)
        for k in range(nodes):
            at = node == k
            sums = [np.bincount(flat_bins[at].ravel(), np.repeat(values[at], columns), minlength=columns * (BINS + 1))
                    .reshape(columns, BINS + 1) for values in (gradient, hessian)]
            left_g, left_h = np.cumsum(sums[0], axis=1), np.cumsum(sums[1], axis=1)
            total_g, total_h = sums[0].sum(axis=1, keepdims=True), sums[1].sum(axis=1, keepdims=True)
            gain = (left_g**2 / (left_h + L2) + (total_g - left_g) ** 2 / (total_h - left_h + L2)
                    - total_g**2 / (total_h + L2))
            gain[~usable | (left_h < MIN_LEAF_WEIGHT) | (total_h - left_h < MIN_LEAF_WEIGHT)] = -np.inf
            column, bin_index = np.unravel_index(np.argmax(gain), gain.shape)
            # no split worth making: every row goes left (a threshold no feature value exceeds)
            threshold = edges[column][bin_index] if gain[column, bin_index] > 0 else np.finfo(np.float64).max
            split_features[tree, k], thresholds[tree, k] = column, threshold
            node[at] = 2 * k + 1 + (features[at, column] > threshold)
        leaf = node - nodes
        leaf_g = np.bincount(leaf, gradient, minlength=nodes + 1)
        leaf_h = np.bincount(leaf, hessian, minlength=nodes + 1)
        leaves[tree] = -LEARNING_RATE * leaf_g / (leaf_h + L2)
        score += leaves[tree][leaf]
    return {"base": base, "split_features": split_features, "thresholds": thresholds, "leaves": leaves}


def predict(trees: dict, features: np.ndarray) -> np.ndarray:
    return tree_scores(features, trees["base"], trees["split_features"], trees["thresholds"], trees["leaves"], DEPTH)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=LINE_MODEL)
    args = parser.parse_args()

    reference = TrafilaturaEngine(ExtractConfig())
    dev = []  # (annotation, lines, features, labels, weights, trafilatura's text)
    for entry, html in annotated_pages():
        if is_held_out(entry["file"]) or not html:
            continue
        texts, features = page_lines(html, BOILERPLATE_ELEMENTS)
        trafilatura_text = reference.extract(html) or ""
        dev.append((entry, texts, features, *labelled_lines(entry, texts, trafilatura_text), trafilatura_text))
    print(f"{len(dev)} dev pages, {sum(len(page[1]) for page in dev)} lines")

    out_of_fold = [np.zeros(0)] * len(dev)
    for fold in range(FOLDS):
        train = [page for i, page in enumerate(dev) if i % FOLDS != fold and len(page[1])]
        trees = fit_trees(*(np.concatenate([page[column] for page in train]) for column in (2, 3, 4)))
        for i in range(fold, len(dev), FOLDS):
            out_of_fold[i] = predict(trees, dev[i][2]) if len(dev[i][1]) else np.zeros(0)

    def kept_text(i: int, threshold: float) -> str:
        return "\n".join(text for text, score in zip(dev[i][1], out_of_fold[i]) if score >= threshold)

    f1 = {t: scores([snippet_counts(page[0], kept_text(i, t)) for i, page in enumerate(dev)])["f1"] for t in THRESHOLDS}
    keep_above = max(THRESHOLDS, key=lambda t: (f1[t], -abs(t)))
    shares = [unsure_share(page[1], out_of_fold[i], keep_above, UNSURE_MARGIN) for i, page in enumerate(dev)]
    max_unsure_share = sorted(shares, reverse=True)[int(FALLBACK_SHARE * len(dev))]
    hybrid = [snippet_counts(page[0], page[5] if share > max_unsure_share else kept_text(i, keep_above))
              for i, (page, share) in enumerate(zip(dev, shares))]
    trafilatura = [snippet_counts(page[0], page[5]) for page in dev]
    print("out-of-fold F1 by threshold: " + ", ".join(f"{t:+.1f}: {f1[t]:.3f}" for t in THRESHOLDS))
    print(f"threshold {keep_above:+.1f}; unsure above {max_unsure_share:.3f} of the text: hybrid out-of-fold F1 "
          f"{scores(hybrid)['f1']:.3f} (trafilatura full mode {scores(trafilatura)['f1']:.3f})")

    trees = fit_trees(*(np.concatenate([page[column] for page in dev if len(page[1])]) for column in (2, 3, 4)))
    model = {"features": list(LINE_FEATURES), "base": trees["base"], "keep_above": keep_above,
             "unsure_margin": UNSURE_MARGIN, "max_unsure_share": max_unsure_share,
             "split_features": trees["split_features"].tolist(), "thresholds": trees["thresholds"].tolist(),
             "leaves": trees["leaves"].tolist()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as staged:
        staged.write_text(json.dumps(model, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
