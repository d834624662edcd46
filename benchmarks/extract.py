"""HTML extraction engines: snippet precision, recall, F1 and pages/s on trafilatura's annotated evaluation pages;
and fastText language id on batches against one document at a time.

    python benchmarks/extract.py                    # every engine, all 658 pages, one core
    python benchmarks/extract.py --engines trafilatura resiliparse_pruned --repeat 3

Quality is scored as trafilatura's authors score extractors (tests/comparison.py in adbar/trafilatura): a `with`
snippet found in the extracted text is a true positive, one missing a false negative; a `without` snippet found
is a false positive. A page with no text counts all its `with` snippets missed. Pages are decoded as the reader
decodes a WARC payload without an HTTP header (the page's charset, else UTF-8, else detected); the few that no
charset decodes are quarantined by the reader, so they count as no text for every engine.

The pages are split once by a hash of the file name: a third is held out (``held-out``), the rest (``dev``) is what
the ``resiliparse_pruned`` rules and the ``hybrid``'s fallback threshold were looked at against, and what
tools/train_extract_lines.py trains ``resiliparse_classified``'s line model on (so its dev figures are in-sample).
Speed is pages/s in this one process (one core), every engine on the same decoded strings, the engines taking turns
page by page; ratios against trafilatura in the same run. For the hybrids the share of pages each handed to
trafilatura is printed under its rows. Every engine's speed against trafilatura is measured again on the real Common
Crawl responses of ``crawl/CC-MAIN-2020-34-excerpt.warc.gz``, with the hybrids' fallback share there (those pages
have no annotations: no F1). Under each engine but trafilatura: a 95% paired-bootstrap interval
of its F1 gap to trafilatura, all pages and held-out.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / ".." / "shared" / "data"
PAGES = DATA / "html/trafilatura-eval-pages.tar.gz"
ANNOTATIONS = DATA / "html/trafilatura-evaldata.json"
CRAWL = DATA / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz"
CC_WARC = DATA / "crawl/CC-MAIN-2020-34-excerpt.warc.gz"
ENGINES = ("trafilatura", "resiliparse", "resiliparse_pruned", "hybrid", "resiliparse_classified", "hybrid_classified")
HYBRIDS = ("hybrid", "hybrid_classified")


def page_fold(file_name: str) -> int:
    """A page's third (0, 1 or 2) by a hash of its file name; the third numbered 0 is held out."""
    return hashlib.sha256(file_name.encode()).digest()[0] % 3


def is_held_out(file_name: str) -> bool:
    return page_fold(file_name) == 0


def annotated_pages() -> list[tuple[dict, str]]:
    """(annotation, decoded HTML or "" when no charset decodes it), in the annotation file's order."""
    from stages.readers import decode_html

    annotations = json.loads(ANNOTATIONS.read_text())
    by_path = {entry["path"]: entry for entry in annotations.values()}
    decoded: dict[str, str] = {}
    with tarfile.open(PAGES, "r:gz") as archive:
        for member in archive:
            if member.name in by_path:
                payload = archive.extractfile(member).read()
                try:
                    decoded[member.name] = decode_html(payload, "")
                except UnicodeDecodeError:
                    decoded[member.name] = ""
    return [(entry, decoded[entry["path"]]) for entry in annotations.values()]


def snippet_counts(annotation: dict, text: str | None) -> tuple[int, int, int]:
    """(true positives, false negatives, false positives) of one page's extracted text."""
    text = text or ""
    found = sum(snippet in text for snippet in annotation["with"])
    return found, len(annotation["with"]) - found, sum(snippet in text for snippet in annotation["without"])


def scores(counts: list[tuple[int, int, int]]) -> dict[str, float]:
    tp, fn, fp = (sum(column) for column in zip(*counts))
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-12)}


def f1_gap_interval(counts: list, base_counts: list, pages: list[int], draws: int = 1000) -> tuple[float, float]:
    """95% interval of (F1 - the baseline's F1), by a paired bootstrap over pages: is a gap more than which pages
    happen to be in the set? Seeded: the same figures every run."""
    draw = random.Random(0)
    gaps = []
    for _ in range(draws):
        sample = [draw.choice(pages) for _ in pages]
        gaps.append(scores([counts[i] for i in sample])["f1"] - scores([base_counts[i] for i in sample])["f1"])
    gaps.sort()
    return gaps[int(0.025 * draws)], gaps[int(0.975 * draws) - 1]


def run_engines(names: list[str], pages: list[tuple[dict, str]], repeat: int) -> dict[str, tuple[list, float, object]]:
    """Every engine's text of every page, its pages/s and the engine. The engines take turns page by page, so a change
    in the load of a shared machine falls on all of them alike; the fastest of ``repeat`` passes over a page counts."""
    from stages.extract import ExtractConfig, build_engine

    engines = {name: build_engine(ExtractConfig(engine=name)) for name in names}
    texts: dict[str, list[str | None]] = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    for _, html in pages:
        for name, engine in engines.items():
            fastest = float("inf")
            for _ in range(repeat):
                started = time.perf_counter()
                text = engine.extract(html) if html else None
                fastest = min(fastest, time.perf_counter() - started)
            texts[name].append(text)
            seconds[name] += fastest
    return {name: (texts[name], len(pages) / seconds[name], engines[name]) for name in names}


def unsure_trade_off(pages: list[tuple[dict, str]], held_out: list[bool], repeat: int) -> None:
    """``hybrid_classified`` at other unsure cuts than its model's: F1 and speed against the share of pages trafilatura
    redoes. One pass times, per page, the classified text with its unsure share, trafilatura fast (the hybrids'
    fallback) and trafilatura (the baseline); each cut's time is then its cheap time plus the fast fallback's on the
    pages it sends."""
    from stages.extract import ClassifiedResiliparse, ExtractConfig, TrafilaturaEngine

    cheap = ClassifiedResiliparse(ExtractConfig())
    fallback, baseline = TrafilaturaEngine(ExtractConfig(), fast=True), TrafilaturaEngine(ExtractConfig())
    rows = []  # (cheap text, unsure share, fallback text, cheap s, fallback s, baseline s)
    for _, html in pages:
        timed = []
        for extract in (cheap.scored, fallback.extract, baseline.extract):
            fastest, result = float("inf"), None
            for _ in range(repeat):
                started = time.perf_counter()
                result = extract(html) if html else None
                fastest = min(fastest, time.perf_counter() - started)
            timed.append((result, fastest))
        (scored, cheap_s), (fallback_text, fallback_s), (_, baseline_s) = timed
        text, share = scored if scored else ("", 1.0)
        rows.append((text, share, fallback_text, cheap_s, fallback_s, baseline_s))
    baseline_total = sum(row[5] for row in rows)
    print(f"\nhybrid_classified by unsure cut (the model's: {cheap.max_unsure_share:.3f}); speed = trafilatura's time "
          "over the classified text's plus trafilatura fast's on the pages sent")
    print(f"{'cut':>6} {'sent':>6} {'F1 all':>7} {'dev':>6} {'held-out':>8} {'speed':>6}")
    for cut in sorted({0.2, 0.3, 0.4, 0.5, 0.6, 0.7, cheap.max_unsure_share}):
        sent = [row[1] > cut for row in rows]
        counts = [snippet_counts(entry, (row[2] or row[0]) if send else row[0])
                  for (entry, _), row, send in zip(pages, rows, sent)]
        f1 = [scores([c for c, h in zip(counts, held_out) if keep(h)])["f1"]
              for keep in (lambda h: True, lambda h: not h, lambda h: h)]
        seconds = sum(row[3] + (row[4] if send else 0.0) for row, send in zip(rows, sent))
        print(f"{cut:6.3f} {sum(sent) / len(sent):6.1%} {f1[0]:7.3f} {f1[1]:6.3f} {f1[2]:8.3f} "
              f"{baseline_total / seconds:5.1f}x")


def crawl_speed(names: list[str], repeat: int) -> None:
    """The engines on real Common Crawl responses (home pages, shops, forums as well as articles): their speed against
    trafilatura on the same pages, and how often each hybrid falls back there. No annotations: no F1."""
    from stages.readers import InputReader, ReadConfig

    pages = [(None, doc.text) for doc in InputReader(CC_WARC, "warc", "cc", ReadConfig()).run()
             if doc.metadata["kind"] == "html"]
    results = run_engines(["trafilatura", *names], pages, repeat)
    base = results["trafilatura"][1]
    print(f"\nthe {len(pages)} CC responses of {CC_WARC.name}: trafilatura {base:.1f} pages/s")
    for name in names:
        _, speed, engine = results[name]
        fallbacks = f"; trafilatura ran on {engine.fallbacks / engine.pages:.0%} of them" if name in HYBRIDS else ""
        print(f"  {name:<22} {speed:8.1f} pages/s ({speed / base:.1f}x){fallbacks}")


def langid_speed(repeat: int) -> None:
    from stages.langid import LangIdConfig, LanguageIdentifier

    with gzip.open(CRAWL, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    identifier = LanguageIdentifier(LangIdConfig(model_path=str(DATA / "models/lid.176.ftz")))
    size = identifier.batch_size
    one = batched = 0.0
    singles, batches = [], []
    for start in range(0, len(texts), size):  # the two take turns batch by batch, as the engines do page by page
        chunk = texts[start:start + size]
        fastest_one = fastest_batch = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            answers = [identifier.identify(text) for text in chunk]
            fastest_one = min(fastest_one, time.perf_counter() - started)
            started = time.perf_counter()
            batch_answers = identifier.identify_batch(chunk)
            fastest_batch = min(fastest_batch, time.perf_counter() - started)
        singles += answers
        batches += batch_answers
        one, batched = one + fastest_one, batched + fastest_batch
    print(f"\nlanguage id, {len(texts)} real CC documents ({sum(map(len, texts)) / len(texts):.0f} chars on average):")
    print(f"  one at a time   : {len(texts) / one:8.0f} docs/s")
    print(f"  batches of {size:<4} : {len(texts) / batched:8.0f} docs/s = {one / batched:.2f}x; identical answers: "
          f"{singles == batches}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each engine on each page; the fastest counts")
    parser.add_argument("--unsure-cuts", action="store_true", help="hybrid_classified's F1 and speed at other cuts")
    args = parser.parse_args()

    pages = annotated_pages()
    held_out = [is_held_out(entry["file"]) for entry, _ in pages]
    undecodable = sum(not html for _, html in pages)
    print(f"{len(pages)} annotated pages ({sum(held_out)} held out, {undecodable} undecodable -> no text), 1 core")
    print(f"{'engine':<20} {'split':<9} {'precision':>9} {'recall':>7} {'F1':>6} {'pages/s':>8} {'speed':>7}")
    results = run_engines(args.engines, pages, args.repeat)
    base = results["trafilatura"][1] if "trafilatura" in results else None
    base_counts = ([snippet_counts(entry, text) for (entry, _), text in zip(pages, results["trafilatura"][0])]
                   if base else None)
    for engine, (texts, speed, extractor) in results.items():
        counts = [snippet_counts(entry, text) for (entry, _), text in zip(pages, texts)]
        ratio = f"{speed / base:6.1f}x" if base else "      -"
        for split, chosen in (("all", counts), ("dev", [c for c, h in zip(counts, held_out) if not h]),
                              ("held-out", [c for c, h in zip(counts, held_out) if h])):
            score = scores(chosen)
            shown = f"{speed:8.1f} {ratio}" if split == "all" else ""
            print(f"{engine:<20} {split:<9} {score['precision']:9.3f} {score['recall']:7.3f} {score['f1']:6.3f} {shown}")
        if hasattr(extractor, "fallbacks"):
            print(f"{'':<20} trafilatura ran on {extractor.fallbacks / extractor.pages:.1%} of the pages")
        if base and engine != "trafilatura":
            intervals = [f"{split} [{low:+.3f}, {high:+.3f}]" for split, chosen in
                         (("all", range(len(pages))), ("held-out", [i for i, h in enumerate(held_out) if h]))
                         for low, high in [f1_gap_interval(counts, base_counts, list(chosen))]]
            print(f"{'':<20} F1 - trafilatura's, 95% paired bootstrap over pages: {', '.join(intervals)}")
    if args.unsure_cuts:
        unsure_trade_off(pages, held_out, args.repeat)
    others = [name for name in args.engines if name != "trafilatura"]
    if "trafilatura" in args.engines and others:
        crawl_speed(others, args.repeat)
    langid_speed(max(args.repeat, 3))


if __name__ == "__main__":
    main()
