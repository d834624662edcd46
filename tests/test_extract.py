"""Extraction engines (choice in config, quality on trafilatura's annotated pages, determinism, the pruning rules)
and language id on batches (the same answers as one document at a time, every document counted)."""

from __future__ import annotations

import gzip
import json
import sys
import tarfile
import time
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document

from core.accounting import Accounting
from core.config import ConfigError
from pipelines.config import parse_config
from stages.extract import (
    BOILERPLATE_ELEMENTS,
    LINE_FEATURES,
    LINE_MODEL,
    LINK_END,
    LINK_START,
    ClassifiedResiliparse,
    ExtractConfig,
    HtmlExtractor,
    HybridExtractor,
    LineModel,
    PrunedResiliparse,
    ResiliparseEngine,
    TrafilaturaEngine,
    build_engine,
    mark_links,
    markup_lines,
    page_lines,
    split_links,
    tree_scores,
)
from stages.langid import LangIdConfig, LanguageIdentifier
from stages.readers import decode_html

ENGINES = ("trafilatura", "resiliparse", "resiliparse_pruned", "hybrid", "resiliparse_classified", "hybrid_classified")
PAGE_COUNT = 24  # the first pages of the annotation file, as it lists them: no choosing


@pytest.fixture(scope="module")
def annotated(shared_data) -> list[tuple[dict, str]]:
    """(annotation, HTML decoded as the reader decodes it) for the first PAGE_COUNT annotated pages."""
    annotations = list(json.loads((shared_data / "html/trafilatura-evaldata.json").read_text()).values())[:PAGE_COUNT]
    wanted = {entry["path"] for entry in annotations}
    html = {}
    with tarfile.open(shared_data / "html/trafilatura-eval-pages.tar.gz", "r:gz") as archive:
        for member in archive:
            if member.name in wanted:
                html[member.name] = decode_html(archive.extractfile(member).read(), "")
                if len(html) == len(wanted):
                    break
    return [(entry, html[entry["path"]]) for entry in annotations]


def _snippet_scores(pages: list[tuple[dict, str]], texts: list[str | None]) -> tuple[float, float, float]:
    """Precision, recall, F1 of `with` snippets found against `without` snippets let through."""
    found = missed = let_through = 0
    for (entry, _), text in zip(pages, texts):
        text = text or ""
        found += sum(snippet in text for snippet in entry["with"])
        missed += sum(snippet not in text for snippet in entry["with"])
        let_through += sum(snippet in text for snippet in entry["without"])
    precision, recall = found / (found + let_through), found / (found + missed)
    return precision, recall, 2 * precision * recall / (precision + recall)


def _job(**sections) -> dict:
    return {"inputs": [{"path": "crawl/*.warc.gz"}], **sections}


def test_engine_is_chosen_in_config():
    kinds = (TrafilaturaEngine, ResiliparseEngine, PrunedResiliparse, HybridExtractor, ClassifiedResiliparse,
             HybridExtractor)
    for name, kind in zip(ENGINES, kinds, strict=True):
        config = parse_config(_job(extract={"engine": name}))
        assert isinstance(HtmlExtractor(config.extract).engine, kind)
    cheap = HtmlExtractor(parse_config(_job(extract={"engine": "hybrid_classified"})).extract).engine.cheap
    assert isinstance(cheap, ClassifiedResiliparse)
    assert isinstance(HtmlExtractor(parse_config(_job()).extract).engine, TrafilaturaEngine)  # the default
    with pytest.raises(ConfigError) as error:
        parse_config(_job(extract={"engine": "boilerpipe"}))
    message = str(error.value)
    assert "extract.engine" in message and "'boilerpipe'" in message and "hybrid" in message
    hybrid = HtmlExtractor(parse_config(_job(extract={"engine": "hybrid", "min_confident_chars": 80})).extract).engine
    assert hybrid.cheap.min_confident_chars == 80


# floors a little under each engine's figure on these pages (0.91, 0.78, 0.85, 0.86, 0.85, 0.86): an engine that kept
# the whole page's text, or lost the article, falls below them
@pytest.mark.parametrize(("engine", "floor"), [("trafilatura", 0.87), ("resiliparse", 0.74), ("resiliparse_pruned", 0.8),
                                               ("hybrid", 0.82), ("resiliparse_classified", 0.8),
                                               ("hybrid_classified", 0.82)])
def test_engine_f1_on_annotated_pages(annotated, engine, floor):
    extractor = build_engine(ExtractConfig(engine=engine))
    precision, recall, f1 = _snippet_scores(annotated, [extractor.extract(html) for _, html in annotated])
    assert f1 >= floor, (precision, recall, f1)


def test_pruning_lets_less_boilerplate_through_than_resiliparse(annotated):
    plain, pruned = build_engine(ExtractConfig(engine="resiliparse")), build_engine(ExtractConfig(engine="resiliparse_pruned"))
    plain_precision, plain_recall, _ = _snippet_scores(annotated, [plain.extract(html) for _, html in annotated])
    pruned_precision, pruned_recall, _ = _snippet_scores(annotated, [pruned.extract(html) for _, html in annotated])
    assert pruned_precision >= plain_precision + 0.1
    assert pruned_recall >= plain_recall - 0.1


@pytest.mark.parametrize("engine", ENGINES)
def test_extraction_is_deterministic(annotated, engine):
    pages = [html for _, html in annotated[:6]]
    first = [build_engine(ExtractConfig(engine=engine)).extract(html) for html in pages]
    again = build_engine(ExtractConfig(engine=engine))
    assert [again.extract(html) for html in pages] == first
    assert [again.extract(html) for html in reversed(pages)] == first[::-1]  # nothing carried from page to page


ARTICLE_PAGE = """<html><body>
<nav><a href="/">Home</a> <a href="/news">News</a></nav>
<div class="teaser"><p>Another story you might like, with enough words in it to be taken for a paragraph.</p></div>
<article>
  <h1>The lighthouse keeper</h1>
  <p>He climbed the stairs every evening to light the lamp, and he polished the lens until it shone.</p>
  <h2>Winter storms</h2>
  <p>In winter the storms were fierce, and the keeper often stayed awake through the whole night.</p>
  <figure><img src="a.jpg" alt="The tower"><figcaption>The tower at dusk, photographed in 1911.</figcaption></figure>
  <p>Home | Archive | Contact | Imprint</p>
  <p><a href="/a">Read the story of the old harbour master and his boats</a></p>
  <p>Tags</p>
  <p>© 2024 Coast Gazette. All rights reserved.</p>
</article>
</body></html>"""


def test_pruning_rules_on_a_known_page():
    text = PrunedResiliparse(ExtractConfig()).extract(ARTICLE_PAGE)
    assert text.split("\n") == [
        "The lighthouse keeper",  # a short line that heads a paragraph stays
        "He climbed the stairs every evening to light the lamp, and he polished the lens until it shone.",
        "Winter storms",
        "In winter the storms were fierce, and the keeper often stayed awake through the whole night.",
    ]  # gone: the teaser outside the article, the caption, the menu, the link line, "Tags", the copyright line


def test_hybrid_redoes_only_pages_whose_cheap_text_is_short():
    pruned_text = PrunedResiliparse(ExtractConfig()).extract(ARTICLE_PAGE)  # 224 characters
    trafilatura_text = TrafilaturaEngine(ExtractConfig()).extract(ARTICLE_PAGE)  # keeps the menu: tells them apart
    assert trafilatura_text != pruned_text
    unsure = HybridExtractor(ExtractConfig(min_confident_chars=len(pruned_text) + 1))
    assert unsure.extract(ARTICLE_PAGE) == trafilatura_text and (unsure.pages, unsure.fallbacks) == (1, 1)
    sure = HybridExtractor(ExtractConfig(min_confident_chars=len(pruned_text)))
    assert sure.extract(ARTICLE_PAGE) == pruned_text and (sure.pages, sure.fallbacks) == (1, 0)


def test_hybrid_keeps_the_cheap_text_when_trafilatura_finds_none():
    class FindsNothing:
        def extract(self, html: str) -> None:
            return None

    hybrid = HybridExtractor(ExtractConfig(min_confident_chars=10_000))
    hybrid.fallback = FindsNothing()
    assert hybrid.extract(ARTICLE_PAGE) == PrunedResiliparse(ExtractConfig()).extract(ARTICLE_PAGE)
    assert hybrid.fallbacks == 1


def test_extractor_stage_counts_what_it_does_not_keep():
    accounting = Accounting()
    extractor = HtmlExtractor(ExtractConfig(engine="resiliparse_pruned"), accounting)
    docs = [
        Document(text=ARTICLE_PAGE, id="article", metadata={"kind": "html", "source": "t"}),
        Document(text="<html><body><nav><a href='/'>Home</a></nav></body></html>", id="menu",
                 metadata={"kind": "html", "source": "t"}),
        Document(text="already text", id="wet", metadata={"kind": "text", "source": "t"}),
    ]
    kept = list(extractor.run(docs))
    assert [doc.id for doc in kept] == ["article", "wet"] and kept[1].text == "already text"
    assert accounting.dropped_total == 1 and not accounting.quarantined


@pytest.fixture(scope="module")
def crawl_texts(shared_data) -> list[str]:
    with gzip.open(shared_data / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def test_batched_language_id_equals_one_at_a_time(crawl_texts, annotated):
    identifier = LanguageIdentifier(LangIdConfig())
    texts = crawl_texts + [html for _, html in annotated] + ["", "   \n ", "a", "日本語のテキスト\nです"]
    assert identifier.identify_batch(texts) == [identifier.identify(text) for text in texts]


def _docs(texts: list[str]) -> list[Document]:
    return [Document(text=text, id=str(i), metadata={"source": "cc"}) for i, text in enumerate(texts)]


def test_batched_language_stage_keeps_drops_and_counts_as_per_document(crawl_texts):
    config = LangIdConfig(keep_languages=["en", "es"], min_score=0.65, batch_size=64)
    per_document, batched = Accounting(), Accounting()
    identifier = LanguageIdentifier(config, per_document)
    expected = [doc for doc in (identifier.process(doc) for doc in _docs(crawl_texts)) if doc is not None]
    kept = list(LanguageIdentifier(config, batched).run(_docs(crawl_texts)))
    assert [(d.id, d.metadata) for d in kept] == [(d.id, d.metadata) for d in expected]
    assert batched.dropped == per_document.dropped and len(kept) + batched.dropped_total == len(crawl_texts)
    assert 0 < len(kept) < len(crawl_texts)


def test_a_hostile_document_costs_only_itself_in_a_batch(crawl_texts):
    accounting = Accounting()
    docs = _docs(crawl_texts[:10])
    docs[4].text = None  # not a string: fastText's predict raises on it
    kept = list(LanguageIdentifier(LangIdConfig(min_score=0.0, batch_size=8), accounting).run(docs))
    assert [d.id for d in kept] == [str(i) for i in range(10) if i != 4]
    assert accounting.quarantined_records == 1 and "4" in str(accounting.quarantined)


def test_link_share_per_line_and_linear_on_hostile_pages():
    marked = mark_links('<p>See <a href="/x">the <b>map</b></a> and <A HREF=y>more</A></p><abbr>no</abbr>')
    assert marked.count(LINK_START) == marked.count(LINK_END) == 2
    text = f"See {LINK_START}the map{LINK_END} and {LINK_START}mo\nre{LINK_END} here"  # a link over two lines
    assert split_links(text) == [("See the map and mo", 9), ("re here", 2)]
    pruned, classified = PrunedResiliparse(ExtractConfig()), ClassifiedResiliparse(ExtractConfig())
    for hostile in ("<p>" + "<a href=x>word " * 50_000 + "</p>", "<p>" + "<a href=x" * 50_000 + "</p>",
                    "<article>" + "<p>A sentence that is long enough, <a href=/x>with a link</a> in it.</p>" * 5_000,
                    LISTING_PAGE):
        for extractor in (pruned, classified):
            started = time.perf_counter()
            extractor.extract(hostile)
            # a pattern that rescans per link took ~10 s on the first three; walking the container candidates by index
            # (resiliparse rebuilds its node list at each access) 120 s on the listing page
            assert time.perf_counter() - started < 5.0


# A listing page: 5,000 teasers, each its own <article> (a container candidate)
LISTING_PAGE = "<main>" + "".join(
    f'<article><h2><a href="/{i}">Teaser {i}</a></h2><p>A short summary of story number {i}, cut off here.</p></article>'
    for i in range(5_000)) + "</main>"


NAV = ["Home", "News", "Sport", "Culture", "Weather", "Contact"]
HARBOUR = [
    "The harbour of the small town was built in the eighteenth century, when fishing boats still went out under sail.",
    "Its stone walls were raised after a storm in 1791 had destroyed most of the wooden piers along the shore.",
    "For two hundred years the fishermen landed herring and cod there, and the market hall stood beside the quay.",
    "When the railway arrived in 1868, the catch could reach the cities inland within a single day of landing.",
    "The decline began after the war, as larger trawlers moved to the deep-water ports further along the coast.",
    "Today the harbour shelters pleasure boats, and the old market hall has become a museum of the fishing trade.",
    "Volunteers restored two of the last sailing boats, which now take visitors out on calm summer evenings.",
    "The town council plans to repair the outer wall next spring, after an engineer found cracks below the waterline.",
]
HARBOUR_PAGE = (
    "<html><head><title>The old harbour</title></head><body><header><ul>"
    + "".join(f'<li><a href="/{name.lower()}">{name}</a></li>' for name in NAV) + "</ul></header>"
    + "<article><h1>The old harbour</h1>" + "".join(f"<p>{text}</p>" for text in HARBOUR) + "</article>"
    + '<div class="more"><h3>More stories</h3><ul><li><a href="/1">Storm damages beach huts</a></li></ul></div>'
    + '<div class="bottom"><p>© 2024 Coast Gazette. All rights reserved.</p><p><a href="/privacy">Privacy</a> | '
    '<a href="/terms">Terms</a> | <a href="/cookies">Cookies</a></p></div></body></html>'
)


def test_line_classifier_keeps_the_article_and_drops_the_boilerplate_lines():
    engine = ClassifiedResiliparse(ExtractConfig())
    texts, features = page_lines(HARBOUR_PAGE, BOILERPLATE_ELEMENTS)
    assert features.shape == (len(texts), len(LINE_FEATURES))
    assert texts[-3:] == ["More stories", "© 2024 Coast Gazette. All rights reserved.", "Privacy | Terms | Cookies"]
    inside = features[:, LINE_FEATURES.index("in_container")]
    assert inside.tolist() == [1.0] * (1 + len(HARBOUR)) + [0.0] * 3  # the <article> marked in the tree
    text, unsure = engine.judged(HARBOUR_PAGE)
    assert text.split("\n") == ["The old harbour", *HARBOUR] and not unsure
    assert all(score < engine.model.keep_above - 0.5 for score in engine.model.scores(features)[-3:])


def test_markup_lines_know_their_block_and_link_text():
    markup = ('<p>See <a href="/x">the map</a> and</p>\n<ul>\n  <li>\n\nfirst item</li>\n</ul>\n'
              '<h2>Title &amp; more</h2>\nplain <a href="y">link\nover lines</a> end')
    assert markup_lines(markup) == [("See the map and", 7, "paragraph"), ("first item", 0, "list_item"),
                                    ("Title & more", 0, "heading"), ("plain link", 4, "other"),
                                    ("over lines end", 10, "other")]


def test_tree_scores_walk_each_tree_to_its_leaf():
    # one tree of depth 2: node 0 splits on feature 0, nodes 1 and 2 on feature 1; leaves 1, 2, 3, 4 left to right
    split_features, thresholds = np.array([[0, 1, 1]]), np.array([[0.5, 0.0, 0.0]])
    leaves = np.array([[1.0, 2.0, 3.0, 4.0]])
    rows = np.array([[0.2, -1.0], [0.2, 1.0], [0.9, -1.0], [0.9, 1.0], [0.5, 0.0]])
    assert tree_scores(rows, 0.5, split_features, thresholds, leaves, 2).tolist() == [1.5, 2.5, 3.5, 4.5, 1.5]
    two_stumps = tree_scores(rows[:3], 0.0, np.array([[0], [1]]), np.array([[0.5], [0.0]]),
                             np.array([[-1.0, 2.0], [0.5, -0.5]]), 1)
    assert two_stumps.tolist() == [-0.5, -1.5, 2.5]


def test_line_model_ships_inside_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    repo = Path(__file__).resolve().parents[1]
    assert LINE_MODEL.parent.parent == repo / "stages" and LINE_MODEL.is_file()
    package_data = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch(str(LINE_MODEL.relative_to(repo / "stages")), pattern) for pattern in package_data["stages"])


def test_line_model_fails_clearly_when_missing_or_stale(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools/train_extract_lines.py"):
        LineModel(tmp_path / "missing.json")
    model = json.loads(LINE_MODEL.read_text())
    model["features"] = model["features"][:-1]
    (tmp_path / "older.json").write_text(json.dumps(model))
    with pytest.raises(ValueError, match="other features"):
        ClassifiedResiliparse(ExtractConfig(line_model=str(tmp_path / "older.json")))


def test_classified_hybrid_falls_back_only_where_the_model_is_unsure():
    class Marks:
        def extract(self, html: str) -> str:
            return "trafilatura's text"

    classified = ClassifiedResiliparse(ExtractConfig()).extract(HARBOUR_PAGE)
    assert classified == TrafilaturaEngine(ExtractConfig()).extract(HARBOUR_PAGE)  # an independent extractor agrees
    hybrid = build_engine(ExtractConfig(engine="hybrid_classified"))
    hybrid.fallback = Marks()
    assert hybrid.extract(HARBOUR_PAGE) == classified and hybrid.fallbacks == 0
    hybrid.cheap.max_unsure_share = -1.0  # unsure of any page
    assert hybrid.extract(HARBOUR_PAGE) == "trafilatura's text" and (hybrid.pages, hybrid.fallbacks) == (2, 1)
    assert hybrid.cheap.scored(HARBOUR_PAGE)[0] == classified and 0 < hybrid.cheap.scored(HARBOUR_PAGE)[1] < 0.5
    assert build_engine(ExtractConfig(engine="hybrid_classified")).cheap.max_unsure_share == LineModel().max_unsure_share
    assert build_engine(ExtractConfig(engine="hybrid_classified", max_unsure_share=0.25)).cheap.max_unsure_share == 0.25
    with pytest.raises(ConfigError, match="max_unsure_share"):
        parse_config(_job(extract={"engine": "hybrid_classified", "max_unsure_share": 1.5}))


def test_tree_training_is_deterministic_and_learns_a_known_rule():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.train_extract_lines import fit_trees, predict

    draw = np.random.default_rng(0)
    features = draw.random((2000, 3))  # the third feature is noise
    labels = ((features[:, 0] > 0.6) ^ (features[:, 1] > 0.3)).astype(float)  # an interaction no single split holds
    weights = np.ones(len(labels))
    trees = fit_trees(features, labels, weights)
    again = fit_trees(features, labels, weights)
    assert all(np.array_equal(trees[key], again[key]) for key in ("split_features", "thresholds", "leaves"))
    held = draw.random((1000, 3))
    truth = (held[:, 0] > 0.6) ^ (held[:, 1] > 0.3)
    assert ((predict(trees, held) >= 0) == truth).mean() >= 0.95
