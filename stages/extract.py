"""Main-text extraction from HTML, with the engine chosen in config.

- ``trafilatura``: trafilatura through datatrove's extractor (FineWeb's and Ultra-FineWeb's choice).
- ``resiliparse``: resiliparse's ``extract_plain_text(main_content=True)`` (DCLM's choice), about 10x faster, but
  it lets boilerplate through (captions, teasers, menus, sharing and cookie lines).
- ``resiliparse_pruned``: resiliparse restricted to the page's article container, with boilerplate elements skipped
  and boilerplate lines dropped (see ``PrunedResiliparse``).

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

Engine = Literal["trafilatura", "resiliparse", "resiliparse_pruned"]


class ExtractConfig(Strict):
    engine: Engine = Field("trafilatura", description="trafilatura | resiliparse | resiliparse_pruned")
    favour_precision: bool = Field(True, description="trafilatura only")
    # trafilatura's deduplicate remembers text segments across documents in a process-wide cache, so a page's
    # output would depend on which pages the same worker saw before: off, for byte-identical re-runs
    deduplicate: bool = Field(False, description="trafilatura only")
    min_line_words: PositiveInt = Field(
        4, description="resiliparse_pruned: a line with fewer words is kept only if it ends a sentence"
    )


class TrafilaturaEngine:
    def __init__(self, config: ExtractConfig):
        self.extractor = Trafilatura(favour_precision=config.favour_precision, deduplicate=config.deduplicate)

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
# A container is the article only if it holds a real share of the page's main text (not a one-line teaser card)
MIN_CONTAINER_SHARE, MIN_CONTAINER_CHARS = 0.1, 200
# Lines that end a sentence (C4 keeps only such lines; here only short lines must): Latin and CJK punctuation,
# closing quotes and brackets
_SENTENCE_END = tuple(".!?…;\"'”“»«)。！？」』")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")  # words without spaces: one word a character
# Menus ("Home | About | Contact") and the site-wide legal lines (copyright, cookie notices)
_MENU_SEPARATORS = 2
_LEGAL = re.compile(r"©|\ball rights reserved\b|\bcopyright\b|\bcookies?\b", re.IGNORECASE)


class PrunedResiliparse:
    """resiliparse's main-content extraction, made precise with three cheap rules from general principles:

    1. read only the article container when the page marks one (schema.org ``articleBody``, CMS classes,
       ``<article>``, ``<main>``), so teasers, comments and related links around it never enter;
    2. skip captions, forms, asides and widgets named as boilerplate (newsletter, related, breadcrumb, ...);
    3. drop boilerplate lines: menus (``a | b | c``), copyright and cookie lines, and short lines that do not end a
       sentence (headings of widgets: "Tags", "Share this", "Read more") - C4's line rule, applied to short lines only.
    """

    def __init__(self, config: ExtractConfig):
        self.min_line_words = config.min_line_words
        self.options = {"main_content": True, "comments": False, "post_meta": False, "alt_texts": False,
                        "skip_elements": BOILERPLATE_ELEMENTS}

    def extract(self, html: str) -> str:
        tree = HTMLTree.parse(html)
        text = self.main_text(tree)
        return "\n".join(line for line in text.split("\n") if self.is_main_line(line.strip()))

    def main_text(self, tree: HTMLTree) -> str:
        page = extract_plain_text(tree, **self.options)
        for selector in ARTICLE_CONTAINERS:
            nodes = tree.document.query_selector_all(selector)
            if len(nodes) == 0:
                continue
            container = max(nodes, key=lambda node: len(node.text))
            text = extract_plain_text(container.html, **self.options)
            if len(text) >= max(MIN_CONTAINER_SHARE * len(page), MIN_CONTAINER_CHARS):
                return text
        return page

    def is_main_line(self, line: str) -> bool:
        if not line or line.count("|") >= _MENU_SEPARATORS or _LEGAL.search(line):
            return False
        words = len(line.split()) + len(_CJK.findall(line))
        return words >= self.min_line_words or line.endswith(_SENTENCE_END)


ENGINES = {"trafilatura": TrafilaturaEngine, "resiliparse": ResiliparseEngine, "resiliparse_pruned": PrunedResiliparse}


def build_engine(config: ExtractConfig) -> TrafilaturaEngine | ResiliparseEngine | PrunedResiliparse:
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
