"""The stage contract shared by every UltraClean step, after datatrove's ``PipelineStep``.

A stage consumes and yields ``datatrove.data.Document`` objects. A stage never silently loses a document: what it
does not yield it reports through ``drop`` (with a reason) or ``quarantine`` (with the error), and an ``Accounting``
shared by the stages of one input unit adds those reports up so the run can prove ``in == kept + dropped +
quarantined``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from itertools import islice

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

    def process_guarded(self, doc: Document) -> Document | None:
        try:
            return self.process(doc)
        except Exception as error:  # noqa: BLE001 - one hostile document must not end the input it came in
            self.quarantine(doc.metadata.get("source", ""), doc.id, f"{type(error).__name__}: {error}")
            return None

    def run(self, data: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in data:
            started = time.perf_counter()
            kept = self.process_guarded(doc)
            self.accounting.seconds[self.name] += time.perf_counter() - started
            if kept is not None:
                yield kept


class BatchStage(Stage):
    """A stage whose library decides many documents in one call (fastText predicts a list of texts at once).

    ``process_batch`` returns one result per document, in order, and reports drops only after everything in it
    that can fail has run: when it raises, the batch is done again one document at a time, so only the hostile
    document is quarantined and every other one is still counted once.
    """

    batch_size: int = 64

    def process_batch(self, docs: list[Document]) -> list[Document | None]:
        raise NotImplementedError

    def process(self, doc: Document) -> Document | None:
        return self.process_batch([doc])[0]

    def run(self, data: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        documents = iter(data)
        while batch := list(islice(documents, self.batch_size)):
            started = time.perf_counter()
            try:
                results = self.process_batch(batch)
            except Exception:  # noqa: BLE001 - find the hostile document: the others must not be lost with it
                results = [self.process_guarded(doc) for doc in batch]
            self.accounting.seconds[self.name] += time.perf_counter() - started
            yield from (kept for kept in results if kept is not None)
