"""Main-text extraction from HTML, with the engine chosen in config.

- ``trafilatura``: trafilatura through datatrove's extractor (FineWeb's and Ultra-FineWeb's choice).
- ``resiliparse``: resiliparse's ``extract_plain_text(main_content=True)`` (DCLM's choice), about 10x faster, but
  it lets boilerplate through (captions, teasers, menus, sharing and cookie lines).
- ``resiliparse_pruned``: resiliparse restricted to the page's article container, with boilerplate elements skipped
  and boilerplate lines dropped (see ``PrunedResiliparse``).
- ``hybrid``: ``resiliparse_pruned``, and trafilatura on the pages where its text is too short to be trusted (see
  ``HybridExtractor``).

Every engine gets the same text: the reader decodes the HTML (HTTP charset, then the page's, then detection), so
an engine never guesses a charset of its own. ``benchmarks/extract.py`` measures each engine's snippet precision,
recall and speed on trafilatura's annotated evaluation pages.
"""

from __future__ import annotations

import re
from typing import Literal

from datatrove.data import Document
from datatrove.pipeline.extractors import Trafilatura
from pydantic import Field, PositiveInt
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.html import HTMLTree

from core.config import Strict
from stages.base import Stage

Engine = Literal["trafilatura", "resiliparse", "resiliparse_pruned", "hybrid"]


class ExtractConfig(Strict):
    engine: Engine = Field("trafilatura", description="trafilatura | resiliparse | resiliparse_pruned | hybrid")
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
# containers); `article`, `main` and #content are the generic fallbacks.
ARTICLE_CONTAINERS = (
    '[itemprop="articleBody"]', '[class*="entry-content"]', '[class*="post-content"]', '[class*="article-body"]',
    '[class*="articleBody"]', '[class*="article-content"]', '[class*="post-body"]', '[class*="story-body"]',
    "article", "main", '[role="main"]', "#content",
)
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
# A line mostly made of link text is navigation or a teaser (jusText's and trafilatura's link-density test)
MAX_LINK_SHARE = 0.5
LINK_START, LINK_END = "\ue000", "\ue001"  # private-use characters: no page text means anything by them
# [^<>]: a broken tag ends at the next one, not the page's end; [aA] rather than IGNORECASE, which re scans slower
_LINK_OPEN = re.compile(r"<[aA]\b[^<>]*>")
_LINK_CLOSE = re.compile(r"</[aA](?=\s*>)")
_LINK_MARK = re.compile(f"([{LINK_START}{LINK_END}])")
# A paragraph: a full sentence of at least this many words; a short line right before one is its heading
PARAGRAPH_WORDS = 10


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
        page_chars = len(tree.body.text) if tree.body is not None else 0
        for selector in ARTICLE_CONTAINERS:
            nodes = tree.document.query_selector_all(selector)
            if len(nodes) == 0:
                continue
            chars = [len(node.text) for node in nodes]  # .text walks the subtree each time: once a node
            if max(chars) < MIN_CONTAINER_SHARE * page_chars:
                continue
            text = extract_plain_text(nodes[chars.index(max(chars))].html, **self.options)
            if len(text) >= MIN_CONTAINER_CHARS:
                return text
        return extract_plain_text(tree, **self.options)

    @staticmethod
    def is_boilerplate(line: str, link_chars: int) -> bool:
        menu = line.count("|") >= _MENU_SEPARATORS
        return menu or link_chars >= MAX_LINK_SHARE * len(line) or bool(_LEGAL.search(line))

    def line_kind(self, line: str) -> str:
        words = len(line.split()) + len(_CJK.findall(line))
        ends_sentence = line.endswith(_SENTENCE_END)
        if words >= PARAGRAPH_WORDS and ends_sentence:
            return "paragraph"
        return "line" if words >= self.min_line_words or ends_sentence else "short"


class HybridExtractor:
    """``resiliparse_pruned`` on every page, trafilatura only where the cheap text looks unsure.

    The signal is the cheap text's length: on the dev pages, those whose pruned text is under
    ``min_confident_chars`` are where the container or the line rules most often cut the article away (a teaser
    taken for the article, a body of short lines), the one group where trafilatura's fuller analysis paid; on the
    others the cheap text stands. ``pages`` and ``fallbacks`` count how often trafilatura ran, the cost that decides the speed.
    """

    def __init__(self, config: ExtractConfig):
        self.cheap = PrunedResiliparse(config)
        # fast: the comparison with readability and jusText left the hybrid's F1 unchanged (0.918 on dev, 0.907 on
        # all pages either way) and makes trafilatura 1.6x slower
        self.fallback = TrafilaturaEngine(config, fast=True)
        self.min_confident_chars = config.min_confident_chars
        self.pages = self.fallbacks = 0

    def extract(self, html: str) -> str | None:
        self.pages += 1
        text = self.cheap.extract(html)
        if len(text) >= self.min_confident_chars:
            return text
        self.fallbacks += 1
        return self.fallback.extract(html) or text  # trafilatura finding nothing does not erase what the cheap path found


ENGINES = {"trafilatura": TrafilaturaEngine, "resiliparse": ResiliparseEngine, "resiliparse_pruned": PrunedResiliparse,
           "hybrid": HybridExtractor}


def build_engine(config: ExtractConfig) -> TrafilaturaEngine | ResiliparseEngine | PrunedResiliparse | HybridExtractor:
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
