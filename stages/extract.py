"""Main-text extraction from HTML with trafilatura, through datatrove's extractor."""

from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.extractors import Trafilatura

from core.config import Strict
from stages.base import Stage


class ExtractConfig(Strict):
    favour_precision: bool = True
    # trafilatura's deduplicate remembers text segments across documents in a process-wide cache, so a page's
    # output would depend on which pages the same worker saw before: off, for byte-identical re-runs
    deduplicate: bool = False


class HtmlExtractor(Stage):
    """HTML documents become their main text; text documents (WET, JSONL, Parquet) pass through unchanged."""

    name = "extract"

    def __init__(self, config: ExtractConfig, accounting=None):
        super().__init__(accounting)
        self.extractor = Trafilatura(favour_precision=config.favour_precision, deduplicate=config.deduplicate)

    def process(self, doc: Document) -> Document | None:
        if doc.metadata.pop("kind") != "html":
            return doc
        try:
            text = self.extractor.extract(doc.text)
        except Exception as error:  # noqa: BLE001 - trafilatura/lxml raise many types on hostile HTML: bad input
            self.quarantine(doc.metadata["source"], doc.id, f"extraction failed: {type(error).__name__}: {error}")
            return None
        if not text or not text.strip():
            self.drop("no_main_text")
            return None
        doc.text = text
        return doc
