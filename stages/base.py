"""The stage contract shared by every UltraClean step, after datatrove's ``PipelineStep``.

A stage consumes and yields ``datatrove.data.Document`` objects. A stage never silently loses a document: what it
does not yield it reports through ``drop`` (with a reason) or ``quarantine`` (with the error), and an ``Accounting``
shared by the stages of one input unit adds those reports up so the run can prove ``in == kept + dropped +
quarantined``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from datatrove.data import Document


@dataclass
class QuarantineEntry:
    source: str
    locator: str
    error: str
    records: int  # input records this entry stands for; 0 for a file-level error that lost an unknown remainder
    stage: str

    def as_dict(self) -> dict:
        return {"source": self.source, "locator": self.locator, "error": self.error, "records": self.records,
                "stage": self.stage}


@dataclass
class Accounting:
    """Where every input record of one input unit went."""

    records_in: int = 0
    dropped: dict[str, Counter] = field(default_factory=dict)
    quarantined: list[QuarantineEntry] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)

    def drop(self, stage: str, reason: str, count: int = 1) -> None:
        self.dropped.setdefault(stage, Counter())[reason] += count

    @property
    def dropped_total(self) -> int:
        return sum(sum(reasons.values()) for reasons in self.dropped.values())

    @property
    def quarantined_records(self) -> int:
        return sum(entry.records for entry in self.quarantined)

    def as_dict(self) -> dict:
        return {
            "records_in": self.records_in,
            "dropped": {stage: dict(sorted(reasons.items())) for stage, reasons in sorted(self.dropped.items())},
            "quarantined": [entry.as_dict() for entry in self.quarantined],
            "seconds": dict(self.seconds),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Accounting:
        return cls(
            records_in=data["records_in"],
            dropped={stage: Counter(reasons) for stage, reasons in data["dropped"].items()},
            quarantined=[QuarantineEntry(**entry) for entry in data["quarantined"]],
            seconds=Counter(data.get("seconds", {})),
        )


class Stage:
    """One step of the pipeline. Subclasses implement ``process`` (per document) or override ``run``."""

    name: str = "stage"

    def __init__(self, accounting: Accounting | None = None):
        self.accounting = accounting if accounting is not None else Accounting()

    def drop(self, reason: str) -> None:
        self.accounting.drop(self.name, reason)

    def quarantine(self, source: str, locator: str, error: str, records: int = 1) -> None:
        self.accounting.quarantined.append(QuarantineEntry(source, locator, error, records, self.name))

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
