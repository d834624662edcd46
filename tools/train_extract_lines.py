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

``--cross-fit`` writes no model: it scores each third of all 658 pages (benchmarks/extract.py's split; third 0 is the
held-out one) with a model fit on the other two exactly as above, and prints the classified and hybrid F1 per third
and pooled against trafilatura's, so a gap on the held-out third can be told from the luck of which pages fell in it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.extract import (
    annotated_pages,
    f1_gap_interval,
    is_held_out,
    page_fold,
    scores,
    snippet_counts,
)
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


def prepared(entry: dict, html: str, reference: TrafilaturaEngine) -> tuple:
    """(annotation, lines, features, labels, weights, trafilatura's text) of one page."""
    texts, features = page_lines(html, BOILERPLATE_ELEMENTS)
    trafilatura_text = reference.extract(html) or ""
    return (entry, texts, features, *labelled_lines(entry, texts, trafilatura_text), trafilatura_text)


def kept_text(page: tuple, line_scores: np.ndarray, threshold: float) -> str:
    return "\n".join(text for text, score in zip(page[1], line_scores) if score >= threshold)


def fit_line_model(pages: list[tuple]) -> tuple[dict, dict]:
    """The line model fit on ``pages`` (``prepared``), threshold and unsure cut chosen out of fold; and the out-of-fold
    figures behind those choices."""
    out_of_fold = [np.zeros(0)] * len(pages)
    for fold in range(FOLDS):
        train = [page for i, page in enumerate(pages) if i % FOLDS != fold and len(page[1])]
        trees = fit_trees(*(np.concatenate([page[column] for page in train]) for column in (2, 3, 4)))
        for i in range(fold, len(pages), FOLDS):
            out_of_fold[i] = predict(trees, pages[i][2]) if len(pages[i][1]) else np.zeros(0)
    f1 = {t: scores([snippet_counts(page[0], kept_text(page, out_of_fold[i], t)) for i, page in enumerate(pages)])["f1"]
          for t in THRESHOLDS}
    keep_above = max(THRESHOLDS, key=lambda t: (f1[t], -abs(t)))
    shares = [unsure_share(page[1], out_of_fold[i], keep_above, UNSURE_MARGIN) for i, page in enumerate(pages)]
    max_unsure_share = sorted(shares, reverse=True)[int(FALLBACK_SHARE * len(pages))]
    hybrid = [snippet_counts(page[0], page[5] if share > max_unsure_share else kept_text(page, out_of_fold[i], keep_above))
              for i, (page, share) in enumerate(zip(pages, shares))]
    trees = fit_trees(*(np.concatenate([page[column] for page in pages if len(page[1])]) for column in (2, 3, 4)))
    model = {"features": list(LINE_FEATURES), "base": trees["base"], "keep_above": keep_above,
             "unsure_margin": UNSURE_MARGIN, "max_unsure_share": max_unsure_share,
             "split_features": trees["split_features"].tolist(), "thresholds": trees["thresholds"].tolist(),
             "leaves": trees["leaves"].tolist()}
    figures = {"f1_by_threshold": f1, "hybrid": scores(hybrid)["f1"],
               "trafilatura": scores([snippet_counts(page[0], page[5]) for page in pages])["f1"]}
    return model, figures


def cross_fit(pages: list[tuple[dict, str]], reference: TrafilaturaEngine) -> None:
    """Each third of all pages scored by a model fit on the other two (threshold and cut chosen inside them, as for the
    shipped model), with trafilatura fast as the hybrid's fallback: is the held-out third's gap to trafilatura the
    method's or the third's? Reads the held-out pages; writes nothing."""
    fallback = TrafilaturaEngine(ExtractConfig(), fast=True)
    thirds = [page_fold(entry["file"]) for entry, html in pages if html]
    ready = [prepared(entry, html, reference) for entry, html in pages if html]
    fallback_texts = [fallback.extract(html) or "" for _, html in pages if html]
    print(f"{'third':<9} {'pages':>5} {'sent':>6} {'classified':>10} {'hybrid':>7} {'trafilatura':>11}   "
          "hybrid - trafilatura, 95% paired bootstrap")
    rows = []  # (third, sent to trafilatura, counts of the classified text, of the hybrid's, of trafilatura's)
    for third in range(3):
        model, _ = fit_line_model([page for page, t in zip(ready, thirds) if t != third])
        trees = {key: np.array(model[key]) for key in ("split_features", "thresholds", "leaves")} | {"base": model["base"]}
        for i in (i for i, t in enumerate(thirds) if t == third):
            page = ready[i]
            line_scores = predict(trees, page[2]) if len(page[1]) else np.zeros(0)
            text = kept_text(page, line_scores, model["keep_above"])
            send = unsure_share(page[1], line_scores, model["keep_above"], UNSURE_MARGIN) > model["max_unsure_share"]
            rows.append((third, send, snippet_counts(page[0], text),
                         snippet_counts(page[0], (fallback_texts[i] or text) if send else text),
                         snippet_counts(page[0], page[5])))
    for name, thirds_shown in (("0 (held)", {0}), ("1", {1}), ("2", {2}), ("pooled", {0, 1, 2})):
        chosen = [row for row in rows if row[0] in thirds_shown]
        f1 = [scores([row[column] for row in chosen])["f1"] for column in (2, 3, 4)]
        sent = sum(row[1] for row in chosen) / len(chosen)
        low, high = f1_gap_interval([row[3] for row in chosen], [row[4] for row in chosen], list(range(len(chosen))))
        print(f"{name:<9} {len(chosen):5d} {sent:6.1%} {f1[0]:10.3f} {f1[1]:7.3f} {f1[2]:11.3f}   [{low:+.3f}, {high:+.3f}]")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=LINE_MODEL)
    parser.add_argument("--cross-fit", action="store_true",
                        help="only report each third of all pages scored by a model fit on the other two")
    args = parser.parse_args()

    reference = TrafilaturaEngine(ExtractConfig())
    if args.cross_fit:
        cross_fit(annotated_pages(), reference)
        return
    dev = [prepared(entry, html, reference) for entry, html in annotated_pages()
           if not is_held_out(entry["file"]) and html]
    print(f"{len(dev)} dev pages, {sum(len(page[1]) for page in dev)} lines")
    model, figures = fit_line_model(dev)
    print("out-of-fold F1 by threshold: " + ", ".join(f"{t:+.1f}: {f:.3f}" for t, f in figures["f1_by_threshold"].items()))
    print(f"threshold {model['keep_above']:+.1f}; unsure above {model['max_unsure_share']:.3f} of the text: hybrid "
          f"out-of-fold F1 {figures['hybrid']:.3f} (trafilatura full mode {figures['trafilatura']:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as staged:
        staged.write_text(json.dumps(model, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
