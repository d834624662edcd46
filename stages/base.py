"""The stage contract shared by every UltraClean step, after datatrove's ``PipelineStep``.

A stage consumes and yields ``datatrove.data.Document`` objects. A stage never silently loses a document: what it
does not yield it reports through ``drop`` (with a reason) or ``quarantine`` (with the error), and an ``Accounting``
shared by the stages of one input unit adds those reports up so the run can prove ``in == kept + dropped +
quarantined``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from datatrove.data import Document

from core.accounting import Accounting


class Stage:
    """One step of the pipeline. Subclasses implement ``process`` (per document) or override ``run``."""

    name: str = "stage"

    def __init__(self, accounting: Accounting | None = None):
        self.accounting = accounting if accounting is not None else Accounting()

    def drop(self, reason: str) -> None:
        self.accounting.drop(self.name, reason)

    def quarantine(self, source: str, locator: str, error: str, records: int = 1) -> None:
        self.accounting.quarantine(source, locator, error, records, self.name)

    def process(self, doc: Document) -> Document | None:
        """Return the (possibly changed) document to keep it, or call ``drop``/``quarantine`` and return None."""
        raise NotImplementedError

    def run(self, data: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in data:
            started = time.perf_counter()
            try:
                kept = self.process(doc)
            except Exception as error:  # noqa: BLE001 - one hostile document must not end the input it came in
                self.quarantine(doc.metadata.get("source", ""), doc.id, f"{type(error).__name__}: {error}")
                kept = None
            self.accounting.seconds[self.name] += time.perf_counter() - started
            if kept is not None:
                yield kept
