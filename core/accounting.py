"""Where every input record went: kept, dropped by a stage (with the reason) or quarantined (with the error).

Each unit of work (an input file, a part of generated dialogues) fills one ``Accounting``; a job adds them up with
``+``, as datatrove's stats merge, and turns the sum into the manifest's stage table (``core.manifest``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class QuarantineEntry:
    source: str
    locator: str
    error: str
    records: int  # input records this entry stands for; 0 for a file-level error that lost an unknown remainder
    stage: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Accounting:
    records_in: int = 0
    dropped: dict[str, Counter] = field(default_factory=dict)
    quarantined: list[QuarantineEntry] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)

    def drop(self, stage: str, reason: str, count: int = 1) -> None:
        if count:
            self.dropped.setdefault(stage, Counter())[reason] += count

    def quarantine(self, source: str, locator: str, error: str, records: int, stage: str) -> None:
        self.quarantined.append(QuarantineEntry(source, locator, error, records, stage))

    def __add__(self, other: Accounting) -> Accounting:
        dropped = {stage: Counter(reasons) for stage, reasons in self.dropped.items()}
        for stage, reasons in other.dropped.items():
            dropped.setdefault(stage, Counter()).update(reasons)
        return Accounting(self.records_in + other.records_in, dropped, self.quarantined + other.quarantined,
                          self.seconds + other.seconds)

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
