"""Main-text extraction from HTML, with the engine chosen in config.

- ``trafilatura``: trafilatura through datatrove's extractor (FineWeb's and Ultra-FineWeb's choice).
- ``resiliparse``: resiliparse's ``extract_plain_text(main_content=True)`` (DCLM's choice), about 10x faster, but
  it lets boilerplate through (captions, teasers, menus, sharing and cookie lines).
- ``resiliparse_pruned``: resiliparse restricted to the page's article container, with boilerplate elements skipped
  and boilerplate lines dropped (see ``PrunedResiliparse``).
- ``hybrid``: ``resiliparse_pruned``, and trafilatura on the pages where its text is too short to be trusted (see
  ``HybridExtractor``).
- ``resiliparse_classified``: resiliparse's lines of the whole page, each kept or dropped by a small learned model
  (gradient-boosted trees on cheap line features, Boilerpipe-style; see ``ClassifiedResiliparse``).
- ``hybrid_classified``: ``resiliparse_classified``, and trafilatura on the pages where the model is unsure of a
  large share of the text.

Every engine gets the same text: the reader decodes the HTML (HTTP charset, then the page's, then detection), so
an engine never guesses a charset of its own. ``benchmarks/extract.py`` measures each engine's snippet precision,
recall and speed on trafilatura's annotated evaluation pages.
"""

from __future__ import annotations

import html as html_entities
import json
import re
from pathlib import Path
from typing import Literal

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.extractors import Trafilatura
from pydantic import Field, PositiveInt
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.html import HTMLTree

from core.config import Strict
from stages.base import Stage

Engine = Literal["trafilatura", "resiliparse", "resiliparse_pruned", "hybrid", "resiliparse_classified",
                 "hybrid_classified"]


class ExtractConfig(Strict):
    engine: Engine = Field(
        "trafilatura",
        description="trafilatura | resiliparse | resiliparse_pruned | hybrid | resiliparse_classified | hybrid_classified",
    )
    favour_precision: bool = Field(True, description="trafilatura and hybrid's fallback")
    # trafilatura's deduplicate remembers text segments across documents in a process-wide cache, so a page's
    # output would depend on which pages the same worker saw before: off, for byte-identical re-runs
    deduplicate: bool = Field(False, description="trafilatura and hybrid's fallback")
    min_line_words: PositiveInt = Field(
        4, description="resiliparse_pruned: a shorter line is kept if it ends a sentence or heads a paragraph"
    )
    min_confident_chars: PositiveInt = Field(
        500, description="hybrid: resiliparse_pruned's text shorter than this is redone by trafilatura"
    )
    line_model: str | None = Field(
        None, description="resiliparse_classified and hybrid_classified: the line model (JSON); null: the shipped one"
    )
    max_unsure_share: float | None = Field(
        None, ge=0, le=1, description="hybrid_classified: trafilatura redoes a page when the model is unsure of more "
        "than this share of its text (lower: more pages, slower); null: the line model's own (5% of dev pages)"
    )


class TrafilaturaEngine:
    def __init__(self, config: ExtractConfig, fast: bool = False):
        # fast: trafilatura's own result only, without comparing it to readability's and jusText's
        self.extractor = Trafilatura(favour_precision=config.favour_precision, deduplicate=config.deduplicate, fast=fast)

    def extract(self, html: str) -> str | None:
        return self.extractor.extract(html)


class ResiliparseEngine:
    def __init__(self, config: ExtractConfig):
        del config  # resiliparse's main-content mode as DCLM runs it: nothing to set

    def extract(self, html: str) -> str:
        return extract_plain_text(html, main_content=True)


# Article bodies as CMSs and schema.org mark them, most specific first (trafilatura's BODY_XPATH looks for the same
# containers); `article`, `main` and #content are the generic fallbacks. (attribute, value, whole value or part of it)
_CONTAINER_MARKS = (
    ("itemprop", "articleBody", "whole"), ("class", "entry-content", "part"), ("class", "post-content", "part"),
    ("class", "article-body", "part"), ("class", "articleBody", "part"), ("class", "article-content", "part"),
    ("class", "post-body", "part"), ("class", "story-body", "part"), ("tag", "article", "whole"),
    ("tag", "main", "whole"), ("role", "main", "whole"), ("id", "content", "whole"),
)
ARTICLE_CONTAINERS = tuple(
    value if attribute == "tag" else f"#{value}" if attribute == "id"
    else f'[{attribute}{"*" if match == "part" else ""}="{value}"]'
    for attribute, value, match in _CONTAINER_MARKS
)
_ANY_CONTAINER = ", ".join(ARTICLE_CONTAINERS)


def container_rank(node) -> int:
    """The index of the first of ARTICLE_CONTAINERS the node matches (one query for all of them, then this, costs
    half of a query per selector)."""
    for rank, (attribute, value, match) in enumerate(_CONTAINER_MARKS):
        actual = node.tag if attribute == "tag" else node.getattr(attribute)
        if actual is not None and (value in actual if match == "part" else actual == value):
            return rank
    return len(_CONTAINER_MARKS)


# Elements that hold no main text even inside an article: captions, forms, asides, and the widgets whose class
# or id names them (the categories trafilatura's discard rules remove). ``:not(body)`` because some sites put such
# words on the body's class.
_BOILERPLATE_NAMES = ("caption", "newsletter", "related", "breadcrumb", "footer", "copyright", "disclaimer", "credit")
BOILERPLATE_ELEMENTS = ["figcaption", "aside", "form", "nav", "footer"] + [
    f'[{attribute}*="{name}"]:not(body)' for name in _BOILERPLATE_NAMES for attribute in ("class", "id")
]
# A container is the article only if it holds a real share of the page's text (not a teaser card) and some text
MIN_CONTAINER_SHARE, MIN_CONTAINER_CHARS = 0.1, 200
# Lines that end a sentence (C4 keeps only such lines; here only short lines must): Latin and CJK punctuation,
# closing quotes and brackets
_SENTENCE_END = tuple(".!?…;\"'”“»«)。！？」』")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")  # words without spaces: one word a character
# Menus ("Home | About | Contact") and the site-wide legal lines (copyright, cookie notices)
_MENU_SEPARATORS = 2
_LEGAL = re.compile(r"©|\ball rights reserved\b|\bcopyright\b|\bcookies?\b", re.IGNORECASE)
# the same words without word bounds on the lowered line: a tenth of the time, and most lines have none
_LEGAL_CANDIDATE = re.compile("©|all rights reserved|copyright|cookie")
# A line mostly made of link text is navigation or a teaser (jusText's and trafilatura's link-density test)
MAX_LINK_SHARE = 0.5
LINK_START, LINK_END = "\ue000", "\ue001"  # private-use characters: no page text means anything by them
# [^<>]: a broken tag ends at the next one, not the page's end; [aA] rather than IGNORECASE, which re scans slower
_LINK_OPEN = re.compile(r"<[aA]\b[^<>]*>")
_LINK_CLOSE = re.compile(r"</[aA](?=\s*>)")
_LINK_MARK = re.compile(f"([{LINK_START}{LINK_END}])")
# A paragraph: a full sentence of at least this many words; a short line right before one is its heading
PARAGRAPH_WORDS = 10


def is_legal(line: str) -> bool:
    """A copyright or cookie line."""
    return _LEGAL_CANDIDATE.search(line.lower()) is not None and _LEGAL.search(line) is not None


def mark_links(html: str) -> str:
    """The HTML with every link's text between LINK_START and LINK_END, so each extracted line knows how much of it
    is link text. A substitution at each link tag: linear in the page however it nests or breaks its tags."""
    # a literal replacement and a function, not "\\g<0>" templates: re expands a template in Python at every match
    return _LINK_CLOSE.sub(LINK_END + "</a", _LINK_OPEN.sub(lambda tag: tag.group(0) + LINK_START, html))


def split_links(text: str) -> list[tuple[str, int]]:
    """Each line of marked text without its marks, with how many of its characters are link text; a link may run
    over several lines."""
    lines, in_link = [], False
    for raw_line in text.split("\n"):
        link_chars = 0
        for piece in _LINK_MARK.split(raw_line):
            if piece in (LINK_START, LINK_END):
                in_link = piece == LINK_START
            elif in_link:
                link_chars += len(piece)
        lines.append((_LINK_MARK.sub("", raw_line), link_chars))
    return lines


def article_containers(tree: HTMLTree):
    """The page's article container candidates, most specific selector first, each with its share of the page's
    text: per selector the largest match, if it holds at least MIN_CONTAINER_SHARE of the text."""
    by_rank: dict[int, list] = {}
    # in document order, as each selector's own query; .values(): indexing resiliparse's node list rebuilds the whole
    # list at every access, so iterating it is quadratic in the matches (0.24 s on a page of 205 <article> teasers)
    for node in tree.document.query_selector_all(_ANY_CONTAINER).values():
        by_rank.setdefault(container_rank(node), []).append(node)
    page_chars = len(tree.body.text) if by_rank and tree.body is not None else 0  # the whole text: only if needed
    for rank in sorted(by_rank):
        nodes = by_rank[rank]
        chars = [len(node.text) for node in nodes]  # .text walks the subtree each time: once a node
        if max(chars) >= MIN_CONTAINER_SHARE * page_chars:
            yield nodes[chars.index(max(chars))], max(chars) / max(page_chars, 1)


class PrunedResiliparse:
    """resiliparse's main-content extraction, made precise with cheap rules from general principles:

    1. read only the article container when the page marks one (schema.org ``articleBody``, CMS classes,
       ``<article>``, ``<main>``), so teasers, comments and related links around it never enter;
    2. skip captions, forms, asides and widgets named as boilerplate (newsletter, related, breadcrumb, ...);
    3. drop boilerplate lines: menus (``a | b | c``), copyright and cookie lines, lines mostly made of link text;
    4. drop short lines (fewer than ``min_line_words``) that neither end a sentence nor head a paragraph: widget
       titles ("Tags", "Share this", "Read more") go, section headings stay (jusText classifies short blocks by
       their neighbours the same way).
    """

    def __init__(self, config: ExtractConfig):
        self.min_line_words = config.min_line_words
        self.min_confident_chars = config.min_confident_chars
        self.options = {"main_content": True, "comments": False, "post_meta": False, "alt_texts": False,
                        "skip_elements": BOILERPLATE_ELEMENTS}

    def extract(self, html: str) -> str:
        lines = [(" ".join(line.split()), link_chars) for line, link_chars in split_links(self.main_text(mark_links(html)))]
        lines = [line for line, link_chars in lines if line and not self.is_boilerplate(line, link_chars)]
        kinds = [self.line_kind(line) for line in lines]
        kept = [line for line, kind, next_kind in zip(lines, kinds, kinds[1:] + ["end"])
                if kind != "short" or next_kind == "paragraph"]
        return "\n".join(kept)

    def main_text(self, html: str) -> str:
        """The article container's text, or the whole page's when no container holds enough of it."""
        tree = HTMLTree.parse(html)
        for node, _ in article_containers(tree):
            text = extract_plain_text(node.html, **self.options)
            if len(text) >= MIN_CONTAINER_CHARS:
                return text
        return extract_plain_text(tree, **self.options)

    def judged(self, html: str) -> tuple[str, bool]:
        """The text and whether it is too short to be trusted (``HybridExtractor``'s signal)."""
        text = self.extract(html)
        return text, len(text) < self.min_confident_chars

    @staticmethod
    def is_boilerplate(line: str, link_chars: int) -> bool:
        menu = line.count("|") >= _MENU_SEPARATORS
        return menu or link_chars >= MAX_LINK_SHARE * len(line) or is_legal(line)

    def line_kind(self, line: str) -> str:
        words = len(line.split()) + len(_CJK.findall(line))
        ends_sentence = line.endswith(_SENTENCE_END)
        if words >= PARAGRAPH_WORDS and ends_sentence:
            return "paragraph"
        return "line" if words >= self.min_line_words or ends_sentence else "short"


# The line model resiliparse_classified ships with, trained by tools/train_extract_lines.py on the dev pages only
LINE_MODEL = Path(__file__).resolve().parent / "models" / "extract_lines.json"
# Between these private-use characters lies the article container's text: a paragraph of four, as resiliparse's
# main-content mode drops a paragraph of one character
CONTAINER_START, CONTAINER_END = "\ue002" * 4, "\ue003" * 4
# resiliparse's minimal HTML: the block each line belongs to and the links' text
_MARKUP_TAG = re.compile(r"<(/?)([a-z][a-z0-9]*)[^<>]*>")
_BLOCK_KINDS = {"p": "paragraph", "li": "list_item", "pre": "preformatted"} | {
    f"h{level}": "heading" for level in range(1, 7)}
BLOCK_KINDS = ("paragraph", "heading", "list_item", "preformatted", "other")
# per line, then the same of the line before and after, then a mean over NEIGHBOURHOOD lines either side
_OWN = ("log_words", "log_chars", "link_share", "ends_sentence", "ends_colon", "digit_share", "upper_share",
        "menu", "legal", "paragraph_like", "under_4_words", "in_container") + tuple(f"is_{kind}" for kind in BLOCK_KINDS)
_NEIGHBOURED = ("log_words", "link_share", "ends_sentence", "paragraph_like", "in_container") + tuple(
    f"is_{kind}" for kind in BLOCK_KINDS)
NEIGHBOURHOOD = 3
LINE_FEATURES = (_OWN + ("has_container", "container_share", "position", "log_lines")
                 + tuple(f"previous_{name}" for name in _NEIGHBOURED) + tuple(f"next_{name}" for name in _NEIGHBOURED)
                 + tuple(f"around_{name}" for name in _NEIGHBOURED))
_NEIGHBOURED_COLUMNS = [_OWN.index(name) for name in _NEIGHBOURED]


def markup_lines(markup: str) -> list[tuple[str, int, str]]:
    """resiliparse's minimal-HTML text as lines: (plain text, characters of link text, kind of block); a block or a
    link may run over several lines. Empty lines are left out."""
    lines, block, in_link = [], "other", False
    for raw_line in markup.split("\n"):
        kind, pieces, link_chars, position = block, [], 0, 0
        for tag in _MARKUP_TAG.finditer(raw_line) if "<" in raw_line else ():
            piece = raw_line[position:tag.start()]
            pieces.append(piece)
            link_chars += len(piece) if in_link else 0
            position = tag.end()
            closing, name = tag.group(1) == "/", tag.group(2)
            if name == "a":
                in_link = not closing
            elif name in _BLOCK_KINDS:
                block = "other" if closing else _BLOCK_KINDS[name]
                kind = kind if closing else block
        pieces.append(raw_line[position:])
        link_chars += len(pieces[-1]) if in_link else 0
        text = " ".join("".join(pieces).split())
        if "&" in text:  # minimal HTML escapes the text's own markup characters
            text = html_entities.unescape(text)
        if text:
            lines.append((text, link_chars, kind))
    return lines


def page_lines(html: str, skip_elements: list[str]) -> tuple[list[str], np.ndarray]:
    """The page's lines as resiliparse's main-content mode extracts them (one parse), and their LINE_FEATURES."""
    tree = HTMLTree.parse(html)
    container, container_share = next(article_containers(tree), (None, 0.0)) if tree.body is not None else (None, 0.0)
    if container is not None:
        start, end = tree.create_element("p"), tree.create_element("p")
        start.append_child(tree.create_text_node(CONTAINER_START))
        end.append_child(tree.create_text_node(CONTAINER_END))
        if container.first_child is None:
            container.append_child(start)
        else:
            container.insert_before(start, container.first_child)
        container.append_child(end)
    markup = extract_plain_text(tree, preserve_formatting="minimal_html", main_content=True, links=True,
                                comments=False, alt_texts=False, skip_elements=skip_elements)
    texts, rows, inside = [], [], False
    for text, link_chars, kind in markup_lines(markup):
        if text == CONTAINER_START or text == CONTAINER_END:
            inside = text == CONTAINER_START
            continue
        words = text.split()
        word_count = len(words) + (0 if text.isascii() else len(_CJK.findall(text)))
        ends_sentence = text.endswith(_SENTENCE_END)
        texts.append(text)
        rows.append((word_count, len(text), min(link_chars / len(text), 1.0), ends_sentence, text.endswith(":"),
                     text.count("|") >= _MENU_SEPARATORS, is_legal(text),
                     word_count >= PARAGRAPH_WORDS and ends_sentence, word_count < 4, inside)
                    + tuple(kind == block for block in BLOCK_KINDS))
    return texts, line_features(texts, np.array(rows, dtype=np.float64), container is not None, container_share)


def line_features(texts: list[str], rows: np.ndarray, has_container: bool, container_share: float) -> np.ndarray:
    """LINE_FEATURES of a page's lines from their counts (``page_lines``'s rows)."""
    count = len(texts)
    if count == 0:
        return np.zeros((0, len(LINE_FEATURES)))
    # digits and capitals per line from the code points of all lines at once
    lengths = rows[:, 1]
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    starts = np.concatenate(([0], np.cumsum(lengths[:-1]))).astype(np.int64)
    digits = np.add.reduceat(((codes >= 48) & (codes <= 57)).astype(np.int64), starts)
    capital = ((codes >= 65) & (codes <= 90)) | ((codes >= 0xC0) & (codes <= 0xDE))  # ASCII and Latin-1 capitals
    capitals = np.add.reduceat(capital.astype(np.int64), starts)
    own = np.column_stack([np.log1p(rows[:, 0]), np.log1p(lengths), rows[:, 2], rows[:, 3], rows[:, 4],
                           digits / lengths, capitals / lengths, rows[:, 5:]])
    page = np.column_stack([np.full(count, float(has_container)), np.full(count, container_share),
                            np.arange(count) / max(count - 1, 1), np.full(count, np.log1p(count))])
    neighboured = own[:, _NEIGHBOURED_COLUMNS]
    padding = np.zeros((1, neighboured.shape[1]))
    previous, following = np.vstack([padding, neighboured[:-1]]), np.vstack([neighboured[1:], padding])
    sums = np.vstack([padding, np.cumsum(neighboured, axis=0)])
    low = np.maximum(np.arange(count) - NEIGHBOURHOOD, 0)
    high = np.minimum(np.arange(count) + NEIGHBOURHOOD + 1, count)
    around = (sums[high] - sums[low]) / (high - low)[:, None]
    return np.hstack([own, page, previous, following, around])


class LineModel:
    """Gradient-boosted trees of equal depth over LINE_FEATURES (the logit of "main text"), the threshold a line's
    score must reach, and the hybrid's unsure signal (a share of the text scored within a margin of the threshold)."""

    def __init__(self, path: str | Path | None = None):
        path = Path(path) if path is not None else LINE_MODEL
        if not path.is_file():
            raise FileNotFoundError(f"no line model at {path}: the package ships stages/models/extract_lines.json; "
                                    "tools/train_extract_lines.py writes it")
        model = json.loads(path.read_text(encoding="utf-8"))
        if tuple(model["features"]) != LINE_FEATURES:
            raise ValueError(f"the line model at {path} was trained on other features than this code computes: "
                             "re-run tools/train_extract_lines.py")
        self.base, self.keep_above = model["base"], model["keep_above"]
        self.unsure_margin, self.max_unsure_share = model["unsure_margin"], model["max_unsure_share"]
        self.split_features = np.array(model["split_features"], dtype=np.int64)
        self.thresholds = np.array(model["thresholds"], dtype=np.float64)
        self.leaves = np.array(model["leaves"], dtype=np.float64)
        self.depth = int(np.log2(self.leaves.shape[1]))

    def scores(self, features: np.ndarray) -> np.ndarray:
        return tree_scores(features, self.base, self.split_features, self.thresholds, self.leaves, self.depth)


def tree_scores(features: np.ndarray, base: float, split_features: np.ndarray, thresholds: np.ndarray,
                leaves: np.ndarray, depth: int) -> np.ndarray:
    """The sum of the trees' leaves each row reaches: node k's children are 2k+1 (feature <= threshold) and 2k+2,
    every tree walked for all rows at once."""
    trees = np.arange(split_features.shape[0])
    rows = np.arange(len(features))[:, None]
    node = np.zeros((len(features), len(trees)), dtype=np.int64)
    for _ in range(depth):
        node = 2 * node + 1 + (features[rows, split_features[trees, node]] > thresholds[trees, node])
    return base + leaves[trees, node - split_features.shape[1]].sum(axis=1)


def unsure_share(texts: list[str], scores: np.ndarray, keep_above: float, margin: float) -> float:
    """The share of the page's text in lines scored within ``margin`` of the threshold (1 for a page without lines)."""
    if not texts:
        return 1.0
    lengths = np.array([len(text) for text in texts])
    return float(lengths[np.abs(scores - keep_above) < margin].sum() / lengths.sum())


class ClassifiedResiliparse:
    """resiliparse's main-content lines of the whole page, each kept if a learned model scores it as main text
    (Boilerpipe's and Dragnet's approach: cheap per-line features, a small classifier).

    The features are a line's own (words, link share, sentence end, digits, capitals, menu and legal patterns, the
    block resiliparse put it in: paragraph, heading, list item), whether it lies in the page's article container
    (marked in the tree before the one extraction), its neighbours' and the page's. Trained on the dev pages only,
    with a line's label from the annotations where a snippet falls in it and otherwise from trafilatura's output.
    """

    def __init__(self, config: ExtractConfig):
        self.model = LineModel(config.line_model)
        self.max_unsure_share = (self.model.max_unsure_share if config.max_unsure_share is None
                                 else config.max_unsure_share)

    def extract(self, html: str) -> str:
        return self.judged(html)[0]

    def judged(self, html: str) -> tuple[str, bool]:
        """The kept lines, and whether the model was unsure of more than ``max_unsure_share`` of the page's text."""
        text, unsure_share = self.scored(html)
        return text, unsure_share > self.max_unsure_share

    def scored(self, html: str) -> tuple[str, float]:
        """The kept lines and the model's ``unsure_share`` of the page."""
        texts, features = page_lines(html, BOILERPLATE_ELEMENTS)
        if not texts:
            return "", 1.0
        scores = self.model.scores(features)
        kept_text = "\n".join(text for text, score in zip(texts, scores) if score >= self.model.keep_above)
        return kept_text, unsure_share(texts, scores, self.model.keep_above, self.model.unsure_margin)


class HybridExtractor:
    """A cheap engine on every page, trafilatura only where the cheap engine says its text is unsure.

    ``resiliparse_pruned``'s signal is its text's length: on the dev pages, those whose pruned text is under
    ``min_confident_chars`` are where the container or the line rules most often cut the article away (a teaser
    taken for the article, a body of short lines), the one group where trafilatura's fuller analysis paid.
    ``resiliparse_classified``'s is the share of the page's text whose lines the model scored close to its
    threshold. ``pages`` and ``fallbacks`` count how often trafilatura ran, the cost that decides the speed.
    """

    def __init__(self, config: ExtractConfig, cheap: PrunedResiliparse | ClassifiedResiliparse | None = None):
        self.cheap = cheap if cheap is not None else PrunedResiliparse(config)
        # fast: the comparison with readability and jusText left the hybrid's F1 unchanged (0.918 on dev, 0.907 on
        # all pages either way) and makes trafilatura 1.6x slower
        self.fallback = TrafilaturaEngine(config, fast=True)
        self.pages = self.fallbacks = 0

    def extract(self, html: str) -> str | None:
        self.pages += 1
        text, unsure = self.cheap.judged(html)
        if not unsure:
            return text
        self.fallbacks += 1
        return self.fallback.extract(html) or text  # trafilatura finding nothing does not erase what the cheap path found


ENGINES = {"trafilatura": TrafilaturaEngine, "resiliparse": ResiliparseEngine, "resiliparse_pruned": PrunedResiliparse,
           "hybrid": HybridExtractor, "resiliparse_classified": ClassifiedResiliparse,
           "hybrid_classified": lambda config: HybridExtractor(config, ClassifiedResiliparse(config))}


def build_engine(
    config: ExtractConfig,
) -> TrafilaturaEngine | ResiliparseEngine | PrunedResiliparse | ClassifiedResiliparse | HybridExtractor:
    return ENGINES[config.engine](config)


class HtmlExtractor(Stage):
    """HTML documents become their main text; text documents (WET, JSONL, Parquet) pass through unchanged."""

    name = "extract"

    def __init__(self, config: ExtractConfig, accounting=None):
        super().__init__(accounting)
        self.engine = build_engine(config)

    def process(self, doc: Document) -> Document | None:
        if doc.metadata.pop("kind") != "html":
            return doc
        try:
            text = self.engine.extract(doc.text)
        except Exception as error:  # noqa: BLE001 - the parsers raise many types on hostile HTML: bad input
            self.quarantine(doc.metadata["source"], doc.id, f"extraction failed: {type(error).__name__}: {error}")
            return None
        if not text or not text.strip():
            self.drop("no_main_text")
            return None
        doc.text = text
        return doc
